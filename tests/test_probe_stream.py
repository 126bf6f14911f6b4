"""The streaming probe across processes (2 gloo processes = 1 process), the engine rule, limited annotations through
the CLI and their bad values."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from msm.cli import build_parser, main
from msm.hunet import random_backbone
from msm.probe import ProbeConfig, run_probes
from msm.probe_stream import choose_engine, run_streaming_probes

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    "5 training rooms, 2 validation rooms of data_samples."
    r = tmp_path_factory.mktemp("stream_root")
    for split, names in (("train", [f"room_{i:04d}" for i in range(5)]), ("val", ["room_0008", "room_0009"])):
        for n in names:
            shutil.copytree(SAMPLES / split / n, r / split / n)
    return r


_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from msm.hunet import random_backbone
from msm.probe import ProbeConfig
from msm.probe_stream import fit_streaming_linear, probe_backbone, _world
from msm.data import list_scenes
# 5 scenes, batches of 3: steps of 3 and 2 scenes, split 2+1 and 1+1 over two processes
cfg = ProbeConfig(epochs=2, warmup_epochs=1, batch_scenes=3, crop_points=3000, knn_max_per_class=300, progress=False)
net = random_backbone("tiny", 0)
res = probe_backbone(net, {root!r}, ("linear", "knn"), sys.argv[1], cfg, engine="stream")
log = []
head = fit_streaming_linear(net, list_scenes({root!r}, "train"), 20, 216, cfg, log=log)
if _world()[0] == 0:
    torch.save({{"weight": head.weight, "bias": head.bias, "log": log,
                "knn": res["knn"]["confusion"], "bank": res["knn"]["bank_points"]}}, sys.argv[1] + "/head.pt")
"""


def test_streaming_two_processes_equal_one(root, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(root=str(root))))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    outs = {}
    for name, cmd in (("one", [sys.executable, str(script)]),
                      ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script)])):
        (tmp_path / name).mkdir()
        run = subprocess.run(cmd + [str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        outs[name] = torch.load(tmp_path / name / "head.pt", weights_only=False)
    a, b = outs["one"], outs["two"]
    # the same crops and labelled points on any number of processes; the losses differ only by summation order
    assert [r["points"] for r in a["log"]] == [r["points"] for r in b["log"]]
    for x, y in zip(a["log"], b["log"]):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    # float32 gradients summed in another order differ by ~1e-7 relative; Adam divides by sqrt(v) ~ |g|, so after
    # 4 steps of lr <= 0.01 the weights agree to well below 1e-5 (a different crop or scene split moves them ~1e-3)
    torch.testing.assert_close(b["weight"], a["weight"], rtol=0, atol=1e-5)
    torch.testing.assert_close(b["bias"], a["bias"], rtol=0, atol=1e-5)
    # the bank is the same set of points (bottom-k keys), so the kNN probe scores identically
    assert a["bank"] == b["bank"] and a["knn"] == b["knn"]
    for name in ("one", "two"):  # only rank 0 wrote, both probes
        for mode in ("linear", "knn"):
            r = json.loads((tmp_path / name / mode / "probe.json").read_text())
            assert r["engine"] == "stream" and r["world_size"] == (1 if name == "one" else 2)


def test_streaming_bank_matches_cached_when_unbounded(root):
    "With bounds above the data, the streaming bank holds every labelled point: the kNN probe equals the cached one."
    net = random_backbone("tiny", 0)
    cfg = ProbeConfig(knn_max_per_class=10**6, knn_per_scene=10**6, train_fraction=0.2, level_ids=(3,), progress=False)
    s = run_streaming_probes(net, root, ("knn",), config=cfg)["knn"]
    c = run_probes(net, root, ("knn",), config=cfg)["knn"]
    assert s["bank_points"] == c["n_train_points"] == s["n_train_points"]
    # equal similarities are ordered alike only up to ties: allow a handful of the 30k points to differ
    diff = np.abs(np.array(s["confusion"]) - np.array(c["confusion"])).sum()
    assert diff <= 1e-3 * s["n_points"], diff


def test_engine_rule(root):
    net = random_backbone("tiny", 0)
    assert choose_engine(net, root, ProbeConfig())[0] == "cached"  # 5 x 15k points x 216 x 4 B = 65 MB < 4 GB
    which, why = choose_engine(net, root, ProbeConfig(cache_budget_gb=0.05))
    assert which == "stream" and "0.1 GB > cache budget 0.05 GB" in why, why
    assert choose_engine(net, root, ProbeConfig(), world=2)[0] == "stream"
    with pytest.raises(Exception, match="cached probe runs in one process"):
        choose_engine(net, root, ProbeConfig(), engine="cached", world=2)


def test_cli_limited_annotations(root, tmp_path, capsys):
    base = ["probe", "--random-init", "--data", str(root), "--epochs", "1"]
    assert main(base + ["--out", str(tmp_path / "k"), "--labelled-points", "20"]) == 0
    r = json.loads((tmp_path / "k" / "probe.json").read_text())
    assert r["n_train_points"] == 5 * 20 and r["config"]["labelled_points"] == 20
    assert main(base + ["--out", str(tmp_path / "f"), "--train-fraction", "0.4", "--mode", "knn", "--engine",
                        "stream"]) == 0
    r = json.loads((tmp_path / "f" / "probe.json").read_text())
    assert r["n_train_scenes"] == 2 and r["engine"] == "stream" and r["mode"] == "knn"
    for flag, value, msg in (("--train-fraction", "0", "train_fraction must be in (0, 1]"),
                             ("--train-fraction", "1.5", "train_fraction must be in (0, 1]"),
                             ("--labelled-points", "0", "labelled_points must be an integer >= 1"),
                             ("--knn-bank", "0", "knn_max_per_class must be >= 1")):
        capsys.readouterr()
        assert main(base + ["--out", str(tmp_path / "bad"), flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_probe_help_names_new_options():
    sub = build_parser()._subparsers._group_actions[0].choices["probe"]
    text = sub.format_help()
    for opt in ("--engine", "--knn-bank", "--train-fraction", "--labelled-points"):
        assert opt in text, opt


def test_workers_prepare_the_same_crops(root):
    "DataLoader workers only prepare crops ahead: the head is the same as with crops made in the main process."
    from msm.data import list_scenes
    from msm.probe_stream import fit_streaming_linear
    net = random_backbone("tiny", 0)
    paths = list_scenes(root, "train")[:3]
    heads = []
    for workers in (0, 1):
        cfg = ProbeConfig(epochs=1, warmup_epochs=0, batch_scenes=2, crop_points=2000, num_workers=workers,
                          progress=False)
        heads.append(fit_streaming_linear(net, paths, 20, 216, cfg))
    torch.testing.assert_close(heads[1].weight, heads[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(heads[1].bias, heads[0].bias, rtol=0, atol=0)


def test_limited_root_gives_the_probe_the_same_labels(root, tmp_path):
    "A probe on limited_root's copy equals the probe with --labelled-points / --train-fraction on the original."
    from msm.probe import limited_root
    net = random_backbone("tiny", 0)
    lim = limited_root(root, tmp_path / "lim", labelled_points=30, train_fraction=0.6, seed=2)
    a = run_probes(net, root, ("linear",), config=ProbeConfig(epochs=2, labelled_points=30, train_fraction=0.6, seed=2,
                                                                 progress=False))["linear"]
    b = run_probes(net, lim, ("linear",), config=ProbeConfig(epochs=2, seed=2, progress=False))["linear"]
    assert a["n_train_scenes"] == b["n_train_scenes"] == 3 and a["n_train_points"] == b["n_train_points"] == 90
    assert a["confusion"] == b["confusion"]
