"""Pre-training across notebooks: exact resume after a kill, DDP (2 gloo processes) = 1 process, bad input, the CLI."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from msm.core import MSMError
from msm.data import save_scene, synthetic_room
from msm.pretrain import PretrainConfig, load_checkpoint, pretrain

STEPS = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    "Three small synthetic rooms in train/, one in val/ (Pointcept layout)."
    r = tmp_path_factory.mktemp("rooms")
    for i in range(3):
        save_scene(synthetic_room(i, n_points=12_000), r / "train" / f"room{i}")
    save_scene(synthetic_room(9, n_points=12_000), r / "val" / "room9")
    return r


def small(**kw) -> PretrainConfig:
    "The tiny preset with small crops: seconds per run on 2 cores."
    return PretrainConfig.tiny().replace(**{"crop_points": 5000, "num_workers": 0, "log_every": 1, "save_every": 2, **kw})


def _lines(path):
    return [json.loads(ln) for ln in open(path)]


def _tensors(ckpt):
    out = {}
    for part in ("model", "teacher", "objective"):
        out.update({f"{part}.{k}": v for k, v in ckpt[part].items()})
    for i, st in ckpt["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


@pytest.fixture(scope="module")
def straight(root, tmp_path_factory):
    "An uninterrupted run of STEPS steps."
    out = tmp_path_factory.mktemp("straight")
    pretrain(small(), root, out, max_steps=STEPS, progress=False)
    return out


def test_checkpoint_and_metrics_contract(straight):
    ckpt = load_checkpoint(straight / "checkpoint.pt")
    for k in ("model", "teacher", "optimizer", "step", "config", "objective", "rng", "method", "total_steps"):
        assert k in ckpt, k
    assert ckpt["step"] == STEPS and ckpt["method"] == "msm" and ckpt["config"]["name"] == "tiny"
    lines = _lines(straight / "metrics.jsonl")
    assert [ln["step"] for ln in lines] == list(range(1, STEPS + 1))
    assert all("loss" in ln and "lr" in ln and "momentum" in ln and "points_per_s" in ln for ln in lines)
    assert not [p for p in os.listdir(straight) if ".tmp" in p]  # atomic saves leave no temporary file


def test_resume_after_kill_equals_uninterrupted(root, straight, tmp_path):
    # "killed" after step 5: the last checkpoint is the one of step 4, metrics.jsonl already holds step 5;
    # this run also uses a DataLoader worker, which must not change the data
    pretrain(small(num_workers=1), root, tmp_path, max_steps=STEPS, progress=False, stop_at=5)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    assert _lines(tmp_path / "metrics.jsonl")[-1]["step"] == 5
    res = pretrain(small(), root, tmp_path, max_steps=STEPS, progress=False, resume=True)
    assert res["step"] == STEPS
    a = _tensors(torch.load(straight / "checkpoint.pt", weights_only=True))
    b = _tensors(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    la, lb = _lines(straight / "metrics.jsonl"), _lines(tmp_path / "metrics.jsonl")
    assert [ln["step"] for ln in lb] == list(range(1, STEPS + 1))  # the step-5 line of the killed run was replaced
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"])), (x["step"], x["loss"], y["loss"])


_DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from msm.pretrain import PretrainConfig, pretrain
# lr pinned: Adam turns float-order differences of near-zero gradients (DDP sums in another order) into weight
# differences of up to ~lr per step, so the tolerance below holds for lr 1.5e-3 (measured max 6e-6; 1.2e-5 at 3e-3)
cfg = PretrainConfig.tiny().replace(**{{"lr": 1.5e-3, "crop_points": 5000, "num_workers": 0, "log_every": 1, "save_every": 100,
                                      "model.drop_path": 0.0, "model.att_drop": 0.0, "model.shuffle_curves": False}})
pretrain(cfg, {root!r}, sys.argv[1], max_steps=3, progress=False)
"""


def test_ddp_two_processes_equal_one(root, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(root=str(root))))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    la, lb = _lines(tmp_path / "one" / "metrics.jsonl"), _lines(tmp_path / "two" / "metrics.jsonl")
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(x["loss"])), (x["step"], x["loss"], y["loss"])
        assert x["voxels_l0"] == y["voxels_l0"]
    a = _tensors(torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True))
    b = _tensors(torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["world_size"] == 2


def test_bad_input(root, straight, tmp_path):
    with pytest.raises(MSMError, match="data root not found"):
        pretrain(small(), tmp_path / "nowhere", tmp_path / "o1", max_steps=1, progress=False)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(MSMError, match="no scenes"):
        pretrain(small(), tmp_path / "empty", tmp_path / "o2", max_steps=1, progress=False)
    with pytest.raises(MSMError, match="unknown preset 'huge'"):
        pretrain("huge", root, tmp_path / "o3", max_steps=1, progress=False)
    with pytest.raises(MSMError, match="no checkpoint to resume from"):
        pretrain(small(), root, tmp_path / "o4", max_steps=1, progress=False, resume=True)
    # a checkpoint of another preset: the message names the file, both presets and the differing fields
    with pytest.raises(MSMError) as e:
        pretrain("ablation", root, straight, max_steps=STEPS, progress=False, resume=True)
    msg = str(e.value)
    assert "checkpoint.pt" in msg and "preset 'tiny'" in msg and "preset 'ablation'" in msg and "model." in msg, msg
    with pytest.raises(MSMError, match="crop_points: checkpoint 5000, this run 6000"):
        pretrain(small().replace(crop_points=6000), root, straight, max_steps=STEPS, progress=False, resume=True)
    with pytest.raises(MSMError, match="6-step run, this run has 9 steps"):
        pretrain(small(), root, straight, max_steps=9, progress=False, resume=True)
    with pytest.raises(MSMError, match="a checkpoint exists already"):
        pretrain(small(), root, straight, max_steps=STEPS, progress=False)
    with pytest.raises(MSMError, match="unknown pre-training method 'simclr'"):
        pretrain(small(), root, tmp_path / "o5", max_steps=1, progress=False, method="simclr")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_text("not a checkpoint")
    with pytest.raises(MSMError, match="checkpoint.pt: not a readable PyTorch checkpoint"):
        pretrain(small(), root, bad, max_steps=1, progress=False, resume=True)


def test_resume_of_finished_run_is_a_no_op(root, straight):
    before = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    res = pretrain(small(), root, straight, progress=False, resume=True)  # run length taken from the checkpoint
    assert res["step"] == STEPS
    after = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    for k in before:
        assert torch.equal(before[k], after[k])


def test_cli_pretrain_and_load_backbone(root, tmp_path):
    from msm.cli import load_backbone, main
    assert main(["pretrain", "--preset", "tiny", "--data", str(root), "--out", str(tmp_path / "cli"), "--max-steps", "1",
                 "--workers", "0", "--no-progress"]) == 0
    net = load_backbone(tmp_path / "cli" / "checkpoint.pt", device="cpu")
    ckpt = torch.load(tmp_path / "cli" / "checkpoint.pt", weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, ckpt["model"][k])
    assert main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--max-steps", "1"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MSM_SLOW"), reason="minutes on 2 CPU cores: set MSM_SLOW=1 to run")
def test_tiny_loss_falls(tmp_path):
    "The issue's bar: tiny on data_samples for 200 steps; the loss of the last 20 steps is clearly below the first 20."
    data = os.path.join(os.path.dirname(__file__), "..", "data_samples")
    res = pretrain("tiny", data, tmp_path, max_steps=200, progress=False)
    lines = _lines(tmp_path / "metrics.jsonl")
    first = sum(ln["loss"] for ln in lines[:4]) / 4
    last = sum(ln["loss"] for ln in lines[-4:]) / 4
    assert last < 0.8 * first, (first, last, res)
