"""The instance probe end to end through `msm probe --task instance`, its bad input, and the AP aggregation rules
across scenes and classes (hand-made records with known answers)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from msm.cli import build_parser, main
from msm.instance import SceneInstances, instance_ap

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("inst_root")
    for split, names in (("train", ["room_0000", "room_0001"]), ("val", ["room_0008"])):
        for n in names:
            shutil.copytree(SAMPLES / split / n, r / split / n)
    return r


def test_cli_instance_probe(root, tmp_path):
    out = tmp_path / "inst"
    assert main(["probe", "--random-init", "--data", str(root), "--out", str(out), "--task", "instance", "--epochs",
                 "2", "--cluster-radius", "0.1", "--min-points", "30", "--labelled-points", "200"]) == 0
    r = json.loads((out / "probe.json").read_text())
    assert 0 <= r["map"] <= r["ap50"] <= r["ap25"] <= 1, r
    assert r["n_train_points"] == 2 * 200 and r["thing_classes"] == list(range(2, 20))
    assert r["config"]["cluster_radius"] == 0.1 and r["n_gt_instances"] > 0


def test_cli_instance_bad_input(root, tmp_path, capsys):
    bare = tmp_path / "bare"
    for s in ("train/room_0000", "val/room_0008"):
        (bare / s).mkdir(parents=True)
        for k in ("coord", "color", "normal", "segment20"):
            shutil.copy(root / s / f"{k}.npy", bare / s)
    base = ["probe", "--random-init", "--out", str(tmp_path / "o"), "--task", "instance"]
    for extra, msg in ((["--data", str(bare)], "no instance ids (instance.npy)"),
                       (["--data", str(root), "--mode", "knn"], "--mode knn does not apply"),
                       (["--data", str(root), "--min-points", "0"], "min_points must be >= 1")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and msg in err[-1], err  # progress bars may precede; the error is one line
        assert sum("error:" in line for line in err) == 1


def _rec(gt, pred, scores, inter):
    return SceneInstances(np.array(gt, dtype=np.int64), np.array(pred, dtype=np.int64), np.array(scores, dtype=float),
                          np.array(inter, dtype=np.int64).reshape(len(gt), len(pred)), np.zeros(len(pred), np.int64))


def test_ap_across_scenes_and_classes():
    # class 2: one chair per scene; scene A found (score 0.6), scene B missed, a false positive in B (score 0.9)
    # class 3: ground truth, no prediction -> AP 0; class 4: nothing -> left out of the mean
    a = {2: _rec([100], [100], [0.6], [[100]]), 3: _rec([100], [], [], []), 4: _rec([], [], [], [])}
    b = {2: _rec([100], [50], [0.9], [[0]]), 3: _rec([], [], [], []), 4: _rec([], [], [], [])}
    res = instance_ap([a, b], classes=[2, 3, 4])
    # class 2 detections: 0.9 false, 0.6 true, one miss. Ascending: at 0.6 precision 1/2, recall 1/2; at 0.9
    # precision 0, recall 0; then (0, 1). Recalls 1/2, 0, 0: weights 1/4, 1/4, 0 -> AP = 1/2 x 1/4 + 0 = 1/8
    assert res["per_class_ap50"] == {"class_2": 0.125, "class_3": 0.0, "class_4": None}
    assert res["ap50"] == pytest.approx((0.125 + 0.0) / 2, abs=1e-12)


def test_probe_help_names_instance_options():
    sub = build_parser()._subparsers._group_actions[0].choices["probe"]
    text = sub.format_help()
    for opt in ("--task", "--cluster-radius", "--min-points"):
        assert opt in text, opt
