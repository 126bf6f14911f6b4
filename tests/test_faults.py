"""Nothing lost, nothing silent: the `msm` command under bad input and faults (issue 23).

Every case asserts the exit status, the one line the user reads, and that nothing was lost: the data and the
checkpoint are unchanged byte for byte where they should be, and a run stopped by a fault resumes to exactly the
weights of a run that never met it. The command runs in-process (`msm.cli.main`) except where a real second
process or a real signal is the point of the case."""
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from msm.cli import main
from msm.core import LOCK_NAME, MSMError, run_lock
from msm.data import save_scene, synthetic_room

STEPS = 4  # every run here: 4 steps, a checkpoint every 2
SETTINGS = ["crop_points=2000", "num_workers=0", "log_every=1", "save_every=2"]


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    "Three small rooms in train/, one in val/ (Pointcept layout)."
    r = tmp_path_factory.mktemp("rooms")
    for i in range(3):
        save_scene(synthetic_room(i, n_points=3000), r / "train" / f"room{i}")
    save_scene(synthetic_room(9, n_points=3000), r / "val" / "room9")
    return r


def pretrain_args(root, out, *extra, settings=SETTINGS):
    return ["pretrain", "--data", str(root), "--out", str(out), "--max-steps", str(STEPS), "--no-progress", *extra,
            "--set", *settings]


def cli(capsys, *argv):
    "Run `msm ARGV` in this process: (exit status, stderr)."
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def one_line(status, err, *words, code=2):
    "The exit status is `code` and stderr holds exactly one `msm ...:` line, with every one of `words`, no traceback."
    assert status == code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("msm ")]
    assert len(lines) == 1, err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def snapshot(folder) -> dict:
    "Every entry under `folder` (symlinks not followed): relative path -> sha1 of its bytes, or its link target."
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def tensors(path) -> dict:
    "All tensors of a checkpoint: weights, teacher, objective, optimiser state."
    ck = torch.load(path, map_location="cpu", weights_only=True)
    out = {f"{part}.{k}": v for part in ("model", "teacher", "objective") for k, v in ck[part].items()}
    for i, st in ck["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


def assert_same_weights(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # resumed runs are bit-exact, not close


def temps(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def straight(root, tmp_path_factory):
    "An uninterrupted 4-step run through the command: the weights every resumed run must end with."
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(pretrain_args(root, out)) == 0
    return out


@pytest.fixture
def half(root, tmp_path):
    "A run stopped after its step-2 checkpoint (as by a kill): the starting point of the save-failure cases."
    from msm.cli import build_parser, pretrain_config
    from msm.pretrain import pretrain
    out = tmp_path / "run"
    cfg = pretrain_config(build_parser().parse_args(pretrain_args(root, out)))  # exactly the command's config
    pretrain(cfg, root, out, max_steps=STEPS, progress=False, stop_at=2)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    return out


def resume_to_end(capsys, root, out, straight):
    "--resume finishes the run with exactly the straight run's weights, each step logged once."
    status, err = cli(capsys, *pretrain_args(root, out, "--resume"))
    assert status == 0, err
    assert_same_weights(out / "checkpoint.pt", straight / "checkpoint.pt")
    assert [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert not temps(out)


# ---------------------------------------------------------------- 1. make-samples

def test_make_samples_refuses_a_non_empty_target(tmp_path, capsys):
    ds = tmp_path / "ds"
    assert main(["make-samples", "--out", str(ds), "--n", "2", "--points", "300"]) == 0
    (ds / "notes.txt").write_text("the user's own file")
    before = snapshot(ds)
    one_line(*cli(capsys, "make-samples", "--out", ds, "--n", 2, "--points", 200), f"{ds}: not empty", "--overwrite")
    assert snapshot(ds) == before
    assert main(["make-samples", "--out", str(ds), "--n", "3", "--points", "200", "--overwrite"]) == 0
    assert "wrote 3 rooms" in capsys.readouterr().out
    rooms = sorted(str(p.relative_to(ds)) for p in ds.glob("*/room_*"))
    assert rooms == ["train/room_0000", "train/room_0001", "val/room_0002"]  # replaced, not mixed with the old set
    assert np.load(ds / "train" / "room_0000" / "coord.npy").shape == (200, 3)
    assert (ds / "notes.txt").read_text() == "the user's own file"  # nothing outside train/ and val/ touched


@pytest.mark.parametrize("args, words", [
    (["--n", "-3"], ["--n -3: need at least 2 rooms"]),
    (["--n", "0"], ["--n 0: need at least 2 rooms"]),
    (["--n", "1"], ["--n 1: need at least 2 rooms (one for train, one for val)"]),  # used to write 2 rooms
    (["--n", "2", "--points", "0"], ["--points 0: need at least 1 point"]),
])
def test_make_samples_bad_counts(tmp_path, capsys, args, words):
    one_line(*cli(capsys, "make-samples", "--out", tmp_path / "ds", *args), *words)
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------- 2. one run per output folder

def test_a_second_run_is_refused_naming_the_holder(root, tmp_path, capsys):
    out = tmp_path / "run"
    with run_lock(out):  # this process holds the folder, as a live run would
        before = snapshot(out)
        line = one_line(*cli(capsys, *pretrain_args(root, out)), f"{out}: another msm pretrain run is writing here",
                        f"pid {os.getpid()} on host {socket.gethostname()}")
        assert "wait for it to end or use another output folder" in line
        one_line(*cli(capsys, *pretrain_args(root, out, "--resume")), "another msm pretrain run is writing here")
        assert snapshot(out) == before  # neither run wrote anything
    assert not out.exists()  # the lock is gone with its holder, and so is the folder it made


def test_live_run_keeps_the_folder_and_kill_9_frees_it(root, tmp_path, capsys):
    "A real second process: refused while the first runs; the first's temp files are safe; kill -9 leaves no lock."
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    live_temp = out / f".checkpoint.pt.tmp{os.getpid()}@{host}"  # a temp of a writer that is alive (this process)
    dead_temp = out / f".checkpoint.pt.tmp4194304@{host}"  # above any pid_max: its writer is gone
    live_temp.write_bytes(b"someone else's checkpoint, half written")
    dead_temp.write_bytes(b"left by a killed run")
    argv = pretrain_args(root, out, settings=["crop_points=2000", "num_workers=0", "log_every=1", "save_every=1"])
    argv[argv.index("--max-steps") + 1] = "60"  # long enough to be running throughout
    first = subprocess.Popen([sys.executable, "-m", "msm.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        t0 = time.time()
        while not (out / "checkpoint.pt").exists() and first.poll() is None and time.time() - t0 < 120:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        one_line(*cli(capsys, *pretrain_args(root, out, "--resume")), "another msm pretrain run is writing here",
                 f"pid {first.pid} on host {host}")
        one_line(*cli(capsys, *pretrain_args(root, out)), "another msm pretrain run is writing here")
        assert live_temp.exists() and not dead_temp.exists()
    finally:
        first.kill()  # SIGKILL: no clean-up runs
        first.wait()
    assert live_temp.exists()
    # the killed run left its lock file, but not its lock: the folder is free at once
    with run_lock(out):
        pass
    one_line(*cli(capsys, *pretrain_args(root, out)), "a checkpoint exists already")  # refused for its own reason


def test_run_lock_is_taken_by_rank_zero_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with run_lock(tmp_path / "run") as lock:
        assert lock is None and not (tmp_path / "run").exists()  # rank 1 writes nothing, locks nothing


# ---------------------------------------------------------------- 3. failed saves: one line, nothing lost, exact resume

def test_failed_save_file_too_large_keeps_the_previous_checkpoint(root, half, straight, capsys):
    "A write error under the checkpoint (here the file-size limit, EFBIG) is one line; the step-2 checkpoint stays."
    before = snapshot(half)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # 1 MB: the metrics fit, a checkpoint does not
    try:
        status, err = cli(capsys, *pretrain_args(root, half, "--resume"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    one_line(status, err, f"{half / 'checkpoint.pt'}: checkpoint not written (File too large)",
             "the previous checkpoint is kept")
    assert snapshot(half)["checkpoint.pt"] == before["checkpoint.pt"] and not temps(half)
    resume_to_end(capsys, root, half, straight)


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or not _unshare_works(),
                    reason="needs a user namespace (unshare -rm) to mount a small tmpfs without root")
def test_disk_full_keeps_the_previous_checkpoint(root, half, straight, tmp_path, capsys):
    "A real full disk (ENOSPC on a tmpfs with room for one checkpoint and a half) during the step-4 save."
    size = (half / "checkpoint.pt").stat().st_size
    mnt, back = tmp_path / "mnt", tmp_path / "back"
    mnt.mkdir()
    before = snapshot(half)
    script = (f'mount -t tmpfs -o size={size * 3 // 2 + (1 << 20)} tmpfs "{mnt}" && cp -a "{half}" "{mnt}/run" && '
              f'"{sys.executable}" -m msm.cli {" ".join(pretrain_args(root, mnt / "run", "--resume"))}; '
              f'echo "status=$?"; cp -a "{mnt}/run" "{back}"')
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    status = int(r.stdout.strip().splitlines()[-1].partition("=")[2])
    line = one_line(status, r.stderr, f"{mnt / 'run' / 'checkpoint.pt'}: checkpoint not written (",
                    "the previous checkpoint is kept")
    assert "No space left on device" in line or "the disk is full" in line, line
    assert snapshot(back)["checkpoint.pt"] == before["checkpoint.pt"] and not temps(back)
    resume_to_end(capsys, root, back, straight)


class _CtrlC:
    "Pickles as a tensor and sends this process `n` Ctrl-Cs (SIGINT) on the way: a user's finger during the write."

    def __init__(self, n):
        self.n = n

    def __reduce_ex__(self, protocol):
        for _ in range(self.n):
            os.kill(os.getpid(), signal.SIGINT)
        return torch.zeros(1).__reduce_ex__(protocol)


def _ctrl_c_at_step(monkeypatch, step, n):
    import msm.pretrain as mp
    real = mp._checkpoint

    def checkpoint(*args, **kw):
        ck = real(*args, **kw)
        return {**ck, "ctrl_c": _CtrlC(n)} if ck["step"] == step else ck
    monkeypatch.setattr(mp, "_checkpoint", checkpoint)


def test_ctrl_c_twice_during_a_save_keeps_the_previous_checkpoint(root, half, straight, capsys, monkeypatch):
    before = snapshot(half)
    _ctrl_c_at_step(monkeypatch, STEPS, 2)
    one_line(*cli(capsys, *pretrain_args(root, half, "--resume")),
             "msm pretrain: interrupted; ", "checkpoint.pt: not written (Ctrl-C during the write); "
             "the previous checkpoint is kept", code=130)
    assert snapshot(half)["checkpoint.pt"] == before["checkpoint.pt"] and not temps(half)
    monkeypatch.undo()
    resume_to_end(capsys, root, half, straight)


def test_ctrl_c_once_during_a_save_waits_for_it(root, half, straight, capsys, monkeypatch):
    _ctrl_c_at_step(monkeypatch, STEPS, 1)
    one_line(*cli(capsys, *pretrain_args(root, half, "--resume")),
             "checkpoint.pt: written in full before stopping (Ctrl-C came during the write)", code=130)
    assert_same_weights(half / "checkpoint.pt", straight / "checkpoint.pt")  # the step-4 save was completed
    assert not temps(half)


def test_ctrl_c_during_training_says_what_is_kept(root, tmp_path):
    "A real Ctrl-C (SIGINT to the process group, as a terminal sends it) with a DataLoader worker running."
    out = tmp_path / "run"
    argv = pretrain_args(root, out, settings=["crop_points=2000", "num_workers=1", "log_every=1", "save_every=2"])
    argv[argv.index("--max-steps") + 1] = "400"
    p = subprocess.Popen([sys.executable, "-m", "msm.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while not (out / "checkpoint.pt").exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    one_line(p.returncode, err, f"msm pretrain: interrupted; {out / 'checkpoint.pt'} holds the last checkpoint "
             "(continue with --resume)", code=130)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # whole, and from a save step
    assert ck["step"] % 2 == 0 and ck["step"] >= 2 and not temps(out) and not (out / LOCK_NAME).exists()


def test_ctrl_c_before_any_checkpoint(root, tmp_path, capsys, monkeypatch):
    import msm.pretrain as mp

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(mp, "_step", interrupted)
    one_line(*cli(capsys, *pretrain_args(root, tmp_path / "run")), "interrupted; no checkpoint was written yet",
             code=130)


# ---------------------------------------------------------------- 4. scenes are never dropped silently

def _no_coord(t):
    (t / "room1" / "coord.npy").unlink()
    return "room1: missing coord.npy"


def _empty_folder(t):
    (t / "room3").mkdir()
    return "room3: a folder in split 'train' that is no scene"


def _coord_loop(t):
    (t / "room1" / "coord.npy").unlink()
    (t / "room1" / "coord.npy").symlink_to("coord.npy")
    return "room1: coord.npy is a broken symlink or a symlink loop"


def _coord_text(t):
    (t / "room1" / "coord.npy").write_text("0.1 0.2 0.3\n")
    return "room1/coord.npy: not a numpy .npy file (no .npy header)"


def _no_color(t):
    (t / "room2" / "color.npy").unlink()
    return "room2: missing color.npy"


def _coord_folder(t):
    (t / "room1" / "coord.npy").unlink()
    (t / "room1" / "coord.npy").mkdir()
    return "room1: coord.npy is a folder, not a file"


def _dangling_scene(t):
    (t / "room5").symlink_to(t / "nowhere")
    return "room5: a broken symlink or a symlink loop"


def _truncated(t):
    f = t / "room0" / "normal.npy"
    f.write_bytes(f.read_bytes()[:-100])
    return "room0/normal.npy: "


@pytest.mark.parametrize("damage", [_no_coord, _empty_folder, _coord_loop, _coord_text, _no_color, _coord_folder,
                                    _dangling_scene, _truncated])
def test_a_broken_scene_stops_pretraining_naming_it(root, tmp_path, capsys, damage):
    data = tmp_path / "data"
    shutil.copytree(root, data, symlinks=True)
    words = damage(data / "train")
    before = snapshot(data)
    one_line(*cli(capsys, *pretrain_args(data, tmp_path / "run")), words)
    assert snapshot(data) == before and not (tmp_path / "run").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("damage", [_no_coord, _empty_folder, _coord_loop])  # a text coord.npy: refused already
def test_a_broken_scene_stops_the_probe_naming_it(root, tmp_path, capsys, damage):
    data = tmp_path / "data"
    shutil.copytree(root, data, symlinks=True)
    words = damage(data / "train")
    one_line(*cli(capsys, "probe", "--random-init", "--data", data, "--mode", "knn", "--out", tmp_path / "p"),
             words.split(": ")[0])
    assert not (tmp_path / "p" / "probe.json").exists()


# ---------------------------------------------------------------- 5. weights that are wrong are refused when loaded

def _other_preset(ck):
    from msm.hunet import HUNetConfig
    ck["config"]["model"] = HUNetConfig.ablation().to_dict()  # the tiny weights under another preset's config
    return "but the checkpoint's own config ('tiny') needs"


def _cut_tensor(ck):
    k = next(k for k, v in ck["model"].items() if v.ndim == 3)
    ck["model"][k] = ck["model"][k][:-1].clone()
    return f"tensor '{k}' has shape"


def _nan_weights(ck):
    k = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.ndim > 1)
    ck["model"][k] = ck["model"][k].clone()
    ck["model"][k].view(-1)[3] = float("nan")
    return f"non-finite weights (NaN or infinity) in tensor {k}"


def _inf_buffer(ck):
    k = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.ndim == 1)
    ck["model"][k] = torch.full_like(ck["model"][k], float("inf"))
    return f"non-finite weights (NaN or infinity) in tensor {k}"


@pytest.mark.parametrize("damage", [_other_preset, _cut_tensor, _nan_weights, _inf_buffer])
@pytest.mark.parametrize("command", ["features", "probe", "viz"])
def test_weights_that_do_not_fit_are_refused(root, straight, tmp_path, capsys, damage, command):
    ck = torch.load(straight / "checkpoint.pt", weights_only=True)
    words = damage(ck)
    bad = tmp_path / "bad.pt"
    torch.save(ck, bad)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    args = {"features": ["--scene", root / "val" / "room9", "--out", out],
            "probe": ["--data", root, "--mode", "knn", "--out", out],
            "viz": ["--scene", root / "val" / "room9", "--out", out]}[command]
    one_line(*cli(capsys, command, "--ckpt", bad, *args), f"{bad}: ", words)
    assert snapshot(tmp_path) == before  # no output written, the checkpoint untouched


# ---------------------------------------------------------------- 5. settings that cannot give a meaningful run

@pytest.mark.parametrize("setting, words", [
    ("lr=1e400", "lr = inf is not a finite number"),
    ("lr=NaN", "lr = nan is not a finite number"),
    ("weight_decay=-Infinity", "weight_decay = -inf is not a finite number"),
    ("lr=1e39", "lr = 1e+39 is not a finite number (in float32"),  # used to crash inside AdamW with a traceback
    ("betas=[0.9, NaN]", "betas[1] = nan is not a finite number"),
])
def test_non_finite_settings_are_refused(root, tmp_path, capsys, setting, words):
    one_line(*cli(capsys, *pretrain_args(root, tmp_path / "run", settings=[*SETTINGS, setting])), words)
    assert not (tmp_path / "run").exists()


def test_diverged_run_before_any_checkpoint_says_so(root, tmp_path, capsys):
    "lr 1e37 gives weights near 1e37 after one step, and non-finite losses after: the message must not claim a checkpoint."
    out = tmp_path / "run"
    settings = ["crop_points=2000", "num_workers=0", "log_every=1", "save_every=4", "max_skipped_steps=2", "lr=1e37"]
    line = one_line(*cli(capsys, *pretrain_args(root, out, settings=settings)),
                    "2 steps in a row with a non-finite loss", "no checkpoint was written yet")
    assert "kept" not in line and not (out / "checkpoint.pt").exists()


# ---------------------------------------------------------------- neighbours a user meets next

def test_features_out_is_a_folder(root, straight, tmp_path, capsys):
    (tmp_path / "feats").mkdir()
    one_line(*cli(capsys, "features", "--ckpt", straight / "checkpoint.pt", "--scene", root / "val" / "room9",
                  "--out", tmp_path / "feats"), f"{tmp_path / 'feats'}: a folder; --out names the .npy file")
    assert not (tmp_path / "feats.npy").exists()  # it used to write feats.npy next to it and print 'wrote feats'


def test_features_names_the_file_it_wrote(root, straight, tmp_path, capsys):
    assert main(["features", "--ckpt", str(straight / "checkpoint.pt"), "--scene", str(root / "val" / "room9"),
                 "--out", str(tmp_path / "feats")]) == 0
    assert f"wrote {tmp_path / 'feats.npy'}" in capsys.readouterr().out and (tmp_path / "feats.npy").is_file()


def _empty(p, good):
    p.write_bytes(b"")
    return "not a readable PyTorch checkpoint (an empty file)"


def _text(p, good):
    p.write_text("weights: none\n")
    return "not a readable PyTorch checkpoint (neither a zip archive nor a pickle)"


def _cut_short(p, good):
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a copy that died half-way
    return "not a readable PyTorch checkpoint (the zip archive is cut short or damaged"


def _unsafe_object(p, good):
    import pathlib
    torch.save({"model": {}, "config": {}, "note": pathlib.PurePosixPath("x")}, p)
    return "holds a Python object (pathlib.PurePosixPath) besides tensors and plain data; it is not loaded, for safety"


@pytest.mark.parametrize("damage", [_empty, _text, _cut_short, _unsafe_object])
def test_unreadable_checkpoints_say_why(root, straight, tmp_path, capsys, damage):
    bad = tmp_path / "bad.pt"
    words = damage(bad, straight / "checkpoint.pt")
    one_line(*cli(capsys, "features", "--ckpt", bad, "--scene", root / "val" / "room9", "--out", tmp_path / "f.npy"),
             f"{bad}: {words}")
    run = tmp_path / "run"  # the same file as the checkpoint of a run to resume
    run.mkdir()
    shutil.copy(bad, run / "checkpoint.pt")
    before = snapshot(run)
    one_line(*cli(capsys, *pretrain_args(root, run, "--resume")), words)
    assert snapshot(run) == before


def test_viz_out_is_a_file(straight, root, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    one_line(*cli(capsys, "viz", "--ckpt", straight / "checkpoint.pt", "--scene", root / "val" / "room9", "--out", f),
             f"{f}: exists and is not a folder")
    assert f.read_text() == "keep me"


def test_resume_when_checkpoint_is_a_folder(root, tmp_path, capsys):
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    assert main(["pretrain", "--preset", "tiny", "--data", str(root), "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint.pt: a folder, not a checkpoint file" in err, err
    assert (tmp_path / "run" / "checkpoint.pt").is_dir()  # nothing touched


def test_a_second_demo_in_the_same_folder_is_refused(tmp_path):
    from msm.demo import run_demo
    (tmp_path / "demo" / "pretrain").mkdir(parents=True)
    (tmp_path / "demo" / "pretrain" / "checkpoint.pt").write_bytes(b"an earlier demo's run")
    with run_lock(tmp_path / "demo", "msm demo"):  # a demo running there now
        with pytest.raises(MSMError, match="another msm demo is writing here"):
            run_demo(tmp_path / "demo", max_steps=1, progress=False)
    assert (tmp_path / "demo" / "pretrain" / "checkpoint.pt").read_bytes() == b"an earlier demo's run"
