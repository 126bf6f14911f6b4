"""HUNet: the official checkpoint layout (all 208 tensors), parameter counts, batches, masked forward, variants, cost."""
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from msm.core import MSMError
from msm.hunet import HUNet, HUNetConfig, MaskedOutput, count_parameters, load_official, to_official
from msm.sparse import SparseTensor, lookup

KEYS = Path(__file__).parent / "data" / "official_checkpoint_keys.tsv"


def _official_layout(seed=0):
    "A state dict with the released checkpoint's names and shapes (tests/data/official_checkpoint_keys.tsv), random values."
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for line in KEYS.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        assert dtype == "float32"
        sd[name] = torch.randn(*map(int, shape.split(",")), generator=g)
    return sd


def _room(n_points, voxel_size, seed=0, batch=0):
    from msm.data import synthetic_room
    from msm.voxelize import voxelize_scene
    vox = voxelize_scene(synthetic_room(seed, n_points=n_points), voxel_size, "first")
    gc = vox["grid_coord"]
    return vox["feat"], torch.cat([torch.full((len(gc), 1), batch, dtype=torch.int32), gc], 1)


def test_round_trip_official_layout(tmp_path):
    sd = _official_layout()
    assert len(sd) == 208
    model = load_official({"state_dict": sd})
    back = to_official(model)
    assert list(back) == list(sd) or set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "teacher": {"x": torch.zeros(1)}}, path)
    again = load_official(path)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    bare = {k[len("module.student."):]: v for k, v in sd.items()}
    for a, b in zip(model.state_dict().values(), load_official(bare).state_dict().values()):
        assert torch.equal(a, b)


def test_load_official_errors(tmp_path):
    sd = _official_layout()
    with pytest.raises(MSMError, match="not found"):
        load_official(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(MSMError, match="junk.pth: not a readable PyTorch checkpoint"):
        load_official(tmp_path / "junk.pth")
    bad = dict(sd)
    bad["module.student.up.0.1.weight"] = torch.zeros(256, 2, 2, 2, 385)
    with pytest.raises(MSMError, match="has shape"):
        load_official(bad)
    extra = dict(sd)
    extra["module.student.final_stem.weight"] = torch.zeros(3)
    with pytest.raises(MSMError, match="final_stem"):
        load_official(extra)
    with pytest.raises(MSMError, match="missing"):
        load_official({k: v for k, v in sd.items() if not k.endswith("skip.0.gamma")})
    with pytest.raises(MSMError, match="hybrid"):
        load_official(sd, replace(HUNetConfig.paper(), block_types="conv"))


def test_parameter_counts():
    assert count_parameters(HUNet(HUNetConfig.paper())) == {"encoder": 33_284_032, "decoder": 34_326_240,
                                                             "total": 67_610_272}
    assert count_parameters(HUNet(HUNetConfig.ablation()))["total"] == 66_988_960


def test_drop_path_schedule():
    m = HUNet(HUNetConfig.paper())
    enc = [b.drop_path.p for s in m.enc for b in s.blocks]
    dec = [b.drop_path.p for s in reversed(m.dec) for b in s.blocks]  # official decoder order: coarsest first
    assert len(enc) == 14 and enc[0] == 0 and abs(enc[-1] - 0.4) < 1e-12 and enc == sorted(enc)
    assert len(dec) == 14 and dec[-1] == 0 and abs(dec[0] - 0.4) < 1e-12 and dec == sorted(dec, reverse=True)


def test_batch_equals_single_scenes():
    f0, c0 = _room(8000, 0.04, seed=0)
    f1, c1 = _room(6000, 0.04, seed=1, batch=1)
    torch.manual_seed(0)
    net = HUNet(replace(HUNetConfig.tiny(), shuffle_curves=False, window=64)).eval()
    with torch.no_grad():
        both = net(SparseTensor(torch.cat([f0, f1]), torch.cat([c0, c1])))
        single = [net(SparseTensor(f0, c0)), net(SparseTensor(f1, c1 * torch.tensor([0, 1, 1, 1], dtype=torch.int32)))]
    for lv in range(4):
        for b, s in enumerate(single):
            rows = lookup(torch.cat([torch.full_like(s[lv].coords[:, :1], b), s[lv].coords[:, 1:]], 1), both[lv].coords)
            assert bool((rows >= 0).all())
            torch.testing.assert_close(both[lv].feats[rows], s[lv].feats, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_types", ["hybrid", "conv", "attention"])
def test_variants_forward_backward(block_types):
    feats, coords = _room(6000, 0.04)
    net = HUNet(replace(HUNetConfig.tiny(), block_types=block_types, drop_path=0.0, window=32)).train()
    out = net(SparseTensor(feats, coords))
    assert [o.feats.shape[1] for o in out] == list(net.level_channels)
    sum(o.feats.square().mean() for o in out).backward()
    assert all(p.grad is not None for p in net.parameters())
    n_att = sum(type(b).__name__ == "AttentionBlock" for s in [*net.enc, *net.dec] for b in s.blocks)
    assert n_att == {"hybrid": 4, "conv": 0, "attention": 12}[block_types]


def test_masked_forward_batch_and_grads():
    f0, c0 = _room(8000, 0.04, seed=0)
    f1, c1 = _room(6000, 0.04, seed=1, batch=1)
    x = SparseTensor(torch.cat([f0, f1]), torch.cat([c0, c1]))
    g = torch.Generator().manual_seed(0)
    patch = torch.unique(torch.cat([x.coords[:, :1], x.coords[:, 1:] // 8], 1), dim=0, return_inverse=True)[1]
    mask = (torch.rand(int(patch.max()) + 1, generator=g) < 0.5)[patch]  # 32 cm patches: masked voxels at every level
    net = HUNet(HUNetConfig.tiny()).train()
    # (an all-zero token would give NaN gradients: msm.sparse.RMSNorm's sqrt has no gradient at a zero row)
    tokens = [(0.02 * torch.randn(c, generator=g)).requires_grad_() for c in net.token_channels]
    res = net(x, mask=mask, mask_tokens=tokens)
    assert isinstance(res, MaskedOutput)
    levels, masked = res
    full = net.encode(SparseTensor(x.feats, x.coords))  # the full voxel sets, from an unmasked encoder
    for lv in range(4):
        assert torch.equal(levels[lv].coords, full[lv].coords)
        assert masked[lv].shape == (len(full[lv]),) and masked[lv].dtype == torch.bool and bool(masked[lv].any())
    sum(o.feats.square().mean() for o in levels).backward()
    assert all(t.grad is not None and bool(t.grad.abs().sum() > 0) for t in tokens)
    with pytest.raises(MSMError, match="hides every voxel"):
        net(x, mask=torch.ones(len(x), dtype=torch.bool), mask_tokens=tokens)
    with pytest.raises(MSMError, match="insertion"):
        net(x, mask=mask, mask_tokens=tokens, insertion="sideways")


def test_tiny_50k_points_seconds():
    feats, coords = _room(50000, 0.04)
    x = SparseTensor(feats, coords)
    net = HUNet(HUNetConfig.tiny()).train()
    t0 = time.perf_counter()
    out = net(x)
    sum(o.feats.square().mean() for o in out).backward()
    dt = time.perf_counter() - t0
    print(f"tiny fwd+bwd, {len(x)} voxels: {dt:.2f} s")
    assert dt < 120, dt  # 1.4 s on 2 idle cores (30k voxels); the bound leaves room for a shared, loaded machine


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    feats, coords = _room(20000, 0.04)
    torch.manual_seed(0)
    net = HUNet(replace(HUNetConfig.tiny(), shuffle_curves=False)).eval()
    with torch.no_grad():
        cpu = net(SparseTensor(feats, coords))
        gpu = net.cuda()(SparseTensor(feats.cuda(), coords.cuda()))
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.coords, b.coords.cpu())
        torch.testing.assert_close(b.feats.cpu(), a.feats, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mask = torch.rand(len(coords), device="cuda") < 0.4
        res = net.train()(SparseTensor(feats.cuda(), coords.cuda()), mask=mask,
                          mask_tokens=[torch.zeros(c, device="cuda") for c in net.token_channels])
        sum(o.feats.float().square().mean() for o in res.levels).backward()
