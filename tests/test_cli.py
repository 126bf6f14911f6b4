"End-to-end runs of the `msm` command: --help everywhere, make-samples, and the errors a user can cause (exit 2)."
import subprocess
import sys

import numpy as np
import pytest

from msm.cli import build_parser, main

COMMANDS = ["demo", "pretrain", "probe", "features", "viz", "make-samples"]


def run_cli(*args, timeout=600):
    "Run `python -m msm.cli ARGS` in a subprocess (as a user would) and return the CompletedProcess."
    return subprocess.run([sys.executable, "-m", "msm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_every_command(cmd):
    r = run_cli(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: msm " + cmd in r.stdout


def test_top_level_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in COMMANDS:
        assert cmd in r.stdout


def test_make_samples_writes_pointcept_layout(tmp_path):
    r = run_cli("make-samples", "--out", tmp_path / "rooms", "--n", 4, "--seed", 1, "--points", 3000)
    assert r.returncode == 0, r.stderr
    train = sorted((tmp_path / "rooms" / "train").iterdir())
    val = sorted((tmp_path / "rooms" / "val").iterdir())
    assert len(train) == 3 and len(val) == 1
    for f in ("coord.npy", "color.npy", "normal.npy", "segment20.npy"):
        assert (train[0] / f).is_file()
    from msm.data import load_scene
    s = load_scene(train[0])
    assert s["coord"].shape == (3000, 3) and s["segment"].max() < 20
    # deterministic in the seed
    run_cli("make-samples", "--out", tmp_path / "again", "--n", 4, "--seed", 1, "--points", 3000)
    np.testing.assert_array_equal(np.load(train[0] / "coord.npy"),
                                  np.load(tmp_path / "again" / "train" / train[0].name / "coord.npy"))


def test_bad_checkpoint_path_exit_2(tmp_path, capsys):
    assert main(["features", "--ckpt", str(tmp_path / "nope.pt"), "--scene", "x", "--out", "y.npy"]) == 2
    err = capsys.readouterr().err
    assert "nope.pt: checkpoint file not found" in err and "Traceback" not in err


def test_garbage_checkpoint_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["features", "--ckpt", str(bad), "--scene", "x", "--out", "y.npy"]) == 2
    assert "bad.pt: not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_pretrain_bad_inputs_exit_2(tmp_path):
    r = run_cli("pretrain", "--preset", "tiny", "--data", tmp_path / "missing", "--out", tmp_path / "o", "--max-steps", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "missing" in r.stderr
    r = run_cli("pretrain", "--preset", "huge", "--data", tmp_path, "--out", tmp_path / "o", "--max-steps", 1)
    assert r.returncode == 2 and "unknown preset 'huge'" in r.stderr, r.stderr
    (tmp_path / "empty" / "train").mkdir(parents=True)
    r = run_cli("pretrain", "--data", tmp_path / "empty", "--out", tmp_path / "o", "--max-steps", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_probe_unknown_preset_exit_2(tmp_path, capsys):
    assert main(["probe", "--random-init", "--preset", "huge", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_parser_contract():
    p = build_parser()
    a = p.parse_args(["pretrain", "--preset", "paper", "--data", "d", "--out", "o", "--epochs", "3", "--resume",
                      "--save-every", "7", "--seed", "5", "--method", "msm"])
    assert (a.preset, a.epochs, a.resume, a.save_every, a.seed, a.method) == ("paper", 3, True, 7, 5, "msm")
    a = p.parse_args(["pretrain", "--data", "d", "--out", "o", "--set", "objective.visible_weight=0.5", "mask.ratio=0.6"])
    from msm.cli import pretrain_config
    cfg = pretrain_config(a)
    assert (cfg.objective.visible_weight, cfg.mask.ratio, cfg.name) == (0.5, 0.6, "tiny")
    a = p.parse_args(["probe", "--ckpt", "c.pt", "--data", "d", "--mode", "knn", "--out", "o"])
    assert a.mode == "knn" and a.ckpt == "c.pt"
