"""CUDA correctness: every layer of the pipeline on CUDA tensors agrees with the CPU (same weights, same voxels).

All tests here are marked `cuda` and skip where no GPU is present; `benchmarks/cuda_report.py` runs them (and the
CUDA cases of the other test files) on a GPU machine and writes a short report. float32 runs with TF32 off and must
match to 1e-4 relative; bf16 autocast must stay within its rounding (a few 1e-2 relative on deep features).
"""
import copy

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    "Relative Frobenius error ||a - b|| / ||b|| (both moved to CPU float64)."
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def room_input(n_points=20_000, voxel_size=0.04, seed=0, batch=1):
    "A SparseTensor of `batch` synthetic rooms (6 input channels) on the CPU."
    from msm.data import synthetic_room
    from msm.sparse import SparseTensor
    from msm.voxelize import collate, voxelize_scene
    vs = [voxelize_scene(synthetic_room(seed + b, n_points=n_points), voxel_size, mode="first") for b in range(batch)]
    bt = collate(vs)
    return SparseTensor(bt["feats"].float(), bt["coords"])


def eval_config(preset):
    from msm.hunet import HUNetConfig
    cfg = getattr(HUNetConfig, preset)()
    return HUNetConfig.from_dict({**cfg.to_dict(), "shuffle_curves": False, "att_drop": 0.0, "drop_path": 0.0})


@pytest.mark.parametrize("preset,n_points,vs", [("tiny", 30_000, 0.04), ("ablation", 30_000, 0.04), ("paper", 20_000, 0.02)])
def test_hunet_forward_cpu_equals_cuda(preset, n_points, vs):
    from msm.hunet import HUNet
    from msm.sparse import SparseTensor
    torch.manual_seed(0)
    model = HUNet(eval_config(preset)).eval()
    x = room_input(n_points, vs, batch=2)
    with torch.no_grad():
        cpu = model(x)
        gpu_model = copy.deepcopy(model).cuda()
        gpu = gpu_model(SparseTensor(x.feats.cuda(), x.coords.cuda()))
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.coords, b.coords.cpu())
        assert rel(b.feats, a.feats) < 1e-4


def test_hunet_bf16_autocast_within_rounding():
    from msm.hunet import HUNet
    from msm.sparse import SparseTensor
    torch.manual_seed(0)
    model = HUNet(eval_config("ablation")).eval().cuda()
    x = room_input(30_000, 0.04)
    xg = SparseTensor(x.feats.cuda(), x.coords.cuda())
    with torch.no_grad():
        ref = model(xg)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(SparseTensor(x.feats.cuda(), x.coords.cuda()))
    for a, b in zip(ref, low):
        assert rel(b.feats.float(), a.feats) < 5e-2


def test_masked_forward_and_backward_cpu_equals_cuda():
    from msm.hunet import HUNet
    from msm.masking import patch_mask
    from msm.sparse import SparseTensor
    torch.manual_seed(0)
    model = HUNet(eval_config("tiny"))
    tokens = [torch.randn(c) for c in model.token_channels]
    x = room_input(20_000, 0.04, batch=2)
    mask = patch_mask(x.coords, 4, 0.4, torch.Generator().manual_seed(0))
    out_c = model(x, mask=mask, mask_tokens=tokens)
    loss_c = sum((lv.feats ** 2).mean() for lv in out_c.levels)
    loss_c.backward()
    g_cpu = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    gm = copy.deepcopy(model).cuda()
    gm.zero_grad()
    out_g = gm(SparseTensor(x.feats.cuda(), x.coords.cuda()), mask=mask.cuda(), mask_tokens=[t.cuda() for t in tokens])
    loss_g = sum((lv.feats ** 2).mean() for lv in out_g.levels)
    loss_g.backward()
    for a, b, ma, mb in zip(out_c.levels, out_g.levels, out_c.masked, out_g.masked):
        assert torch.equal(ma, mb.cpu())
        assert rel(b.feats, a.feats) < 1e-4
    for n, p in gm.named_parameters():
        if n in g_cpu:
            assert rel(p.grad, g_cpu[n]) < 1e-3, n


def test_window_attention_cpu_equals_cuda():
    from msm.serialize import window_attention
    g = torch.Generator().manual_seed(0)
    M, H, D = 3000, 4, 8
    q, k, v = (torch.randn(M, H, D, generator=g) for _ in range(3))
    batch = torch.cat([torch.zeros(1800, dtype=torch.long), torch.ones(1200, dtype=torch.long)])
    cpu = window_attention(q, k, v, batch, 256)
    gpu = window_attention(q.cuda(), k.cuda(), v.cuda(), batch.cuda(), 256)
    assert rel(gpu, cpu) < 1e-5


def test_masks_cpu_equals_cuda():
    from msm.masking import level_masks, patch_mask
    x = room_input(20_000, 0.04, batch=2)
    m_cpu = patch_mask(x.coords, 4, 0.4, torch.Generator().manual_seed(3))
    m_gpu = patch_mask(x.coords.cuda(), 4, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(m_cpu, m_gpu.cpu())
    for (ca, ma), (cb, mb) in zip(level_masks(x.coords, m_cpu, 4), level_masks(x.coords.cuda(), m_gpu, 4)):
        assert torch.equal(ca, cb.cpu()) and torch.equal(ma, mb.cpu())


def test_probe_sampling_cpu_equals_cuda():
    from msm.probe import sample_features
    from msm.sparse import SparseTensor
    g = torch.Generator().manual_seed(0)
    pts = torch.randint(0, 64, (5000, 3), generator=g)
    levels = []
    for lv in range(4):
        c = torch.unique(torch.div(pts, 2 ** lv, rounding_mode="floor"), dim=0)
        coords = torch.cat([torch.zeros(len(c), 1, dtype=torch.int32), c.int()], 1)
        levels.append(SparseTensor(torch.randn(len(c), 8, generator=g), coords, stride=2 ** lv))
    for align in ("center", "official"):
        cpu = sample_features(levels, pts, align=align)
        gpu = sample_features([lv.to("cuda") for lv in levels], pts.cuda(), align=align)
        assert rel(gpu, cpu) < 1e-5


def test_pretrain_objective_cpu_equals_cuda(tmp_path):
    "One MSM loss evaluation on the same batch: CPU and CUDA agree (teacher, matching, masks, heads, loss)."
    from msm.pretrain import PretrainConfig, get_method
    cfg = PretrainConfig.tiny().replace(**{"model.drop_path": 0.0, "model.att_drop": 0.0, "model.shuffle_curves": False,
                                           "crop_points": 8000})
    spec = get_method("msm")
    from msm.data import synthetic_room
    sampler = spec.build_sampler(cfg)
    samples = [sampler(synthetic_room(s, n_points=10_000), np.random.default_rng(s)) for s in range(2)]
    batch = spec.collate(samples)
    torch.manual_seed(0)
    model = spec.build_model(cfg)
    from msm.core import to_device
    torch.manual_seed(1)
    loss_cpu = model(batch)["loss"]
    gm = copy.deepcopy(model).cuda()
    torch.manual_seed(1)
    loss_gpu = gm(to_device(batch, "cuda"))["loss"]
    assert abs(float(loss_gpu) - float(loss_cpu)) <= 1e-4 * max(1.0, abs(float(loss_cpu)))
