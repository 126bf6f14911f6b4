"""The fused Triton convolution (msm.fused_conv, Conv3d(backend="triton")) against the PyTorch engine.

On CUDA machines the kernels run compiled; elsewhere, when Triton is installed, they run in Triton's interpreter on
CPU tensors (set here before Triton is first imported). Without Triton only the neighbour-table tests run."""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of Triton in this process
    os.environ.setdefault("TRITON_INTERPRET", "1")

import msm.fused_conv as fc  # noqa: E402
import msm.sparse  # noqa: E402
from msm.core import MSMError  # noqa: E402
from msm.fused_conv import fused_sparse_conv, neighbour_table, triton_available  # noqa: E402
from msm.kernel_maps import KernelMap, downsample, kernel_map, random_coords, sparse_conv  # noqa: E402
from msm.sparse import Conv3d, SparseTensor, sparse_backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kernels_run_on(device: str) -> None:
    "Skip unless the fused kernels can run on `device` in this process."
    if not triton_available():
        pytest.skip("Triton is not installed")
    if device == "cpu" and not fc.triton_interpreter_on():
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set: no interpreter for CPU tensors")


def _maps(device):
    "(name, map, transposed) for every kind of map a Conv3d uses, with negative coordinates and two scenes."
    cc = random_coords(120, lo=-4, hi=4, seed=3).to(device)
    coarse, dkm = downsample(cc)
    part = coarse[::2].contiguous()  # a coarse set missing half the parents: some fine voxels get nothing
    return [("subm3", kernel_map(cc, 3), False), ("subm5", kernel_map(cc, 5), False), ("down", dkm, False),
            ("transposed", dkm, True), ("transposed, partial", msm.sparse._reparent(dkm, part), True)]


@pytest.mark.parametrize("device", DEVICES)
def test_neighbour_table_holds_exactly_the_pairs(device):
    for name, km, tr in _maps(device):
        src, dst = (km.out_idx, km.in_idx) if tr else (km.in_idx, km.out_idx)
        table = neighbour_table(km, tr)
        assert table.shape == (len(km.offsets), km.n_in if tr else km.n_out), name
        for k, (s, d) in enumerate(zip(src, dst)):
            want = torch.full((table.shape[1],), -1, dtype=torch.int32, device=device)
            want[d] = s.int()
            assert torch.equal(table[k], want), (name, k)


def test_neighbour_table_rejects_two_sources():
    cc = random_coords(4, seed=0)
    km = KernelMap([torch.tensor([0, 1])], [torch.tensor([2, 2])], torch.zeros(1, 3, dtype=torch.int32), 4, 4, cc, cc)
    with pytest.raises(MSMError, match="from two source rows"):
        neighbour_table(km)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [(3, 5), (20, 70), (70, 130)])  # below one tile, several input / output tiles
def test_forward_and_gradients_equal_engine(device, channels, monkeypatch):
    _kernels_run_on(device)
    monkeypatch.setattr(fc, "_CPU_PROGRAMS", 400)  # several row ranges in the weight gradient on the CPU too
    c_in, c_out = channels
    torch.manual_seed(0)
    for name, km, tr in _maps(device):
        if channels != (3, 5) and name == "subm5":
            continue  # 125 offsets x large tiles: minutes in the interpreter, nothing new
        n_in, n_out = (km.n_out, km.n_in) if tr else (km.n_in, km.n_out)
        f = torch.randn(n_in, c_in, device=device, requires_grad=True)
        w = torch.randn(len(km.offsets), c_in, c_out, device=device, requires_grad=True)
        b = torch.randn(c_out, device=device, requires_grad=True)
        go = torch.randn(n_out, c_out, device=device)
        ours, ref = fused_sparse_conv(f, w, km, b, transposed=tr), sparse_conv(f, w, km, b, transposed=tr)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=name)
        for g1, g2, what in zip(torch.autograd.grad(ours, (f, w, b), go), torch.autograd.grad(ref, (f, w, b), go),
                                ("feats", "kernel", "bias")):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-3, msg=f"{name}: grad {what}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_double(device):
    _kernels_run_on(device)
    cc = random_coords(30, lo=-2, hi=2, seed=5).to(device)
    km, (_, dkm) = kernel_map(cc, 3), downsample(cc)
    for m, tr, n in ((km, False, km.n_in), (dkm, True, dkm.n_out)):
        f = torch.randn(n, 2, dtype=torch.float64, device=device, requires_grad=True)
        w = torch.randn(len(m.offsets), 2, 3, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda f, w, m=m, tr=tr: fused_sparse_conv(f, w, m, transposed=tr), (f, w),
                                        fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input(device):
    _kernels_run_on(device)
    km = kernel_map(torch.zeros(0, 4, dtype=torch.int32, device=device), 3)
    f = torch.zeros(0, 4, device=device, requires_grad=True)
    w = torch.randn(27, 4, 6, device=device, requires_grad=True)
    out = fused_sparse_conv(f, w, km)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device", DEVICES)
def test_conv3d_backend_triton_equals_torch(device):
    _kernels_run_on(device)
    torch.manual_seed(1)
    cc = random_coords(200, lo=-5, hi=5, seed=7)
    layers = [Conv3d(8, 16, 2, 2, bias=True), Conv3d(16, 16, 3), Conv3d(16, 8, 2, 2, transposed=True)]
    layers = [m.to(device) for m in layers]
    feats = torch.randn(len(cc), 8)
    outs, grads = {}, {}
    for backend in ("torch", "triton"):
        x = SparseTensor(feats.clone().to(device).requires_grad_(True), cc.to(device))
        with sparse_backend(backend):
            y = layers[2](layers[1](layers[0](x)))
        y.feats.square().sum().backward()
        outs[backend], grads[backend] = y, [x.feats.grad] + [m.kernel.grad.clone() for m in layers]
        for m in layers:
            m.zero_grad()
    assert torch.equal(outs["triton"].coords, outs["torch"].coords)  # the transposed conv restores the finer set
    torch.testing.assert_close(outs["triton"].feats, outs["torch"].feats, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bfloat16_autocast_cuda():
    _kernels_run_on("cuda")
    cc = random_coords(3000, lo=-15, hi=15, seed=8).cuda()
    conv = Conv3d(32, 64, 3).cuda()
    x = SparseTensor(torch.randn(len(cc), 32, device="cuda"), cc)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with sparse_backend("torch"):
            ref = conv(x).feats
        with sparse_backend("triton"):
            ours = conv(x).feats
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_clear_errors(monkeypatch):
    x = SparseTensor(torch.randn(10, 4), random_coords(10, seed=2))
    monkeypatch.setattr(msm.sparse, "triton_available", lambda: False)
    with pytest.raises(MSMError, match="backend 'triton' needs Triton"):
        Conv3d(4, 4, 3, backend="triton")(x)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_cpu_tensors_without_interpreter_say_so():
    "Without TRITON_INTERPRET, CPU tensors get one sentence naming the fix (a fresh process: the mode is per import)."
    code = ("import torch\nfrom msm.fused_conv import fused_sparse_conv\nfrom msm.kernel_maps import kernel_map, "
            "random_coords\nc = random_coords(20)\ntry:\n    fused_sparse_conv(torch.randn(20, 4), torch.randn(27, 4, 4), "
            "kernel_map(c, 3))\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300).stdout
    assert "MSMError" in out and "TRITON_INTERPRET=1" in out, out


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow)]
                         + (["cuda"] if torch.cuda.is_available() else []))
def test_hunet_tiny_backend_triton_equals_torch(device):
    "The whole tiny HUNet, forward and backward, on both engines (fixed curve order: eval is otherwise random)."
    _kernels_run_on(device)
    from dataclasses import replace

    from msm.data import synthetic_room
    from msm.hunet import HUNet, HUNetConfig
    from msm.voxelize import voxelize_scene
    vox = voxelize_scene(synthetic_room(0, n_points=2000), 0.08, "first")  # about 1.8k voxels
    coords = torch.cat([torch.zeros(len(vox["grid_coord"]), 1, dtype=torch.int32), vox["grid_coord"]], 1).to(device)
    torch.manual_seed(0)
    net = HUNet(replace(HUNetConfig.tiny(), shuffle_curves=False)).to(device).eval()
    got = {}
    for backend in ("torch", "triton"):
        x = SparseTensor(vox["feat"].clone().to(device).requires_grad_(True), coords)
        with sparse_backend(backend):
            levels = net(x)
        sum(lv.feats.square().mean() for lv in levels).backward()
        got[backend] = [lv.feats.detach() for lv in levels] + [x.feats.grad] + [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
    for a, b in zip(got["triton"], got["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tf32_setting_of_either_api_is_read():
    "torch's newer `fp32_precision` setting makes the older `allow_tf32` unreadable; the kernels read either."
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has only allow_tf32")
    before = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        assert fc._tf32_allowed()
        m.fp32_precision = "ieee"
        assert not fc._tf32_allowed()
    finally:
        m.fp32_precision = before
