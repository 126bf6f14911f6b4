"""Heavier tests of msm.sparse: dense-conv equality on random inputs, gradcheck, kernel maps against brute force,
transposed restoration, the cache, bad input, and equality with spconv's CPU build (and torchsparse where installed)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import msm.kernel_maps
import msm.sparse
from msm.core import MSMError
from msm.sparse import (
    Conv3d,
    DropPath,
    RMSNorm,
    SparseTensor,
    downsample,
    kernel_map,
    kernel_offsets,
    lookup,
    sparse_backend,
    sparse_conv,
)


def random_coords(n, batch=3, lo=-8, hi=8, shift=(0, 0, 0), seed=0):
    "n distinct random voxel coords int32 (n, 4) over `batch` scenes in [lo, hi)^3 + shift."
    return msm.kernel_maps.random_coords(n, batch, lo, hi, seed) + torch.tensor([0, *shift], dtype=torch.int32)


def dense_weight(kernel, ks, transposed=False):
    "(K, C_in, C_out) -> torch's conv3d (C_out, C_in, k, k, k) or conv_transpose3d (C_in, C_out, k, k, k) layout."
    r = ks // 2 if ks % 2 else 0
    w = kernel.new_zeros(kernel.shape[2], kernel.shape[1], ks, ks, ks)
    for k, (dx, dy, dz) in enumerate(kernel_offsets(ks).tolist()):
        w[:, :, dx + r, dy + r, dz + r] = kernel[k].t()
    return w.transpose(0, 1) if transposed else w


def at_sites(dense, coords, origin):
    l = coords[:, 1:].long() - torch.as_tensor(origin, device=coords.device).long()
    return dense[coords[:, 0].long(), :, l[:, 0], l[:, 1], l[:, 2]]


def brute_map(coords, ks):
    where = {tuple(r): i for i, r in enumerate(coords.tolist())}
    out = {}
    for k, (dx, dy, dz) in enumerate(kernel_offsets(ks).tolist()):
        out[k] = {(where[(b, x + dx, y + dy, z + dz)], o) for o, (b, x, y, z) in enumerate(coords.tolist())
                  if (b, x + dx, y + dy, z + dz) in where}
    return out


SHIFTS = [(0, 0, 0), (-1_000_001, 77, 3_000_000)]  # negative and large coordinates
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the same tests on the GPU where there is one


@pytest.fixture(autouse=True)
def _no_tf32():
    "Full float32 on GPUs: cuDNN's TF32 default makes the dense references too coarse for 1e-5."
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("ks", [1, 3, 5])
def test_subm_equals_dense_conv3d(ks, shift, device):
    cc = random_coords(500, shift=shift, seed=ks)
    cc = torch.cat([cc, torch.tensor([[0, 100, 100, 100]], dtype=torch.int32) + torch.tensor([0, *shift])]).int()
    cc = cc.to(device)
    x = SparseTensor(torch.randn(len(cc), 5, device=device), cc)  # the last voxel has an empty neighbourhood
    conv = Conv3d(5, 7, ks, bias=True).to(device)
    origin = (cc[:, 1:].min(0).values - ks // 2).tolist()
    shape = (cc[:, 1:].max(0).values - cc[:, 1:].min(0).values + 1 + 2 * (ks // 2)).tolist()
    dense = x.dense(shape, origin)
    ref = F.conv3d(dense, dense_weight(conv.kernel.data, ks), conv.bias.data, padding=ks // 2)
    out = conv(x)
    torch.testing.assert_close(out.feats, at_sites(ref, cc, origin), atol=1e-5, rtol=1e-5)
    assert out.coords is x.coords


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift", [(0, 0, 0), (-1_000_001, 77, 3_000_001)])
def test_down_and_transposed_equal_dense(shift, device):
    cc = random_coords(600, shift=shift, seed=5).to(device)
    x = SparseTensor(torch.randn(len(cc), 4, device=device), cc)
    down = Conv3d(4, 6, 2, stride=2, bias=True).to(device)
    up = Conv3d(6, 3, 2, stride=2, bias=True, transposed=True).to(device)
    lo = torch.div(cc[:, 1:].min(0).values, 2, rounding_mode="floor") * 2
    shape = (cc[:, 1:].max(0).values - lo + 2).tolist()
    shape = [s + s % 2 for s in shape]
    ref = F.conv3d(x.dense(shape, lo.tolist()), dense_weight(down.kernel.data, 2), down.bias.data, stride=2)
    x_s2 = down(x)
    assert x_s2.stride == 2 and x_s2.cache is x.cache
    torch.testing.assert_close(x_s2.feats, at_sites(ref, x_s2.coords, (lo // 2).tolist()), atol=1e-5, rtol=1e-5)
    ref_up = F.conv_transpose3d(x_s2.dense([s // 2 for s in shape], (lo // 2).tolist()),
                                dense_weight(up.kernel.data, 2, True), up.bias.data, stride=2)
    x_up = up(x_s2)
    assert x_up.coords is x.coords and x_up.stride == 1
    torch.testing.assert_close(x_up.feats, at_sites(ref_up, cc, lo.tolist()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ks", [3, 5])
def test_kernel_map_brute_force(ks, device):
    for cc in (random_coords(300, seed=2), random_coords(300, lo=-40, hi=40, seed=3),
               random_coords(300, seed=2) * torch.tensor([1, 1, 1, 5000], dtype=torch.int32)):  # sparse columns
        km = kernel_map(cc.to(device), ks)
        got = {k: set(zip(km.in_idx[k].tolist(), km.out_idx[k].tolist())) for k in range(ks**3)}
        assert got == brute_map(cc, ks)


def test_downsample_map_brute_force():
    cc = random_coords(400, lo=-9, hi=9, seed=4)
    coarse, km = downsample(cc)
    parents = sorted({(b, x // 2, y // 2, z // 2) for b, x, y, z in cc.tolist()})
    assert coarse.tolist() == [list(p) for p in parents]
    row = {p: i for i, p in enumerate(parents)}
    for k, (dx, dy, dz) in enumerate(kernel_offsets(2).tolist()):
        ref = {(i, row[(b, x // 2, y // 2, z // 2)]) for i, (b, x, y, z) in enumerate(cc.tolist())
               if (x % 2, y % 2, z % 2) == (dx, dy, dz)}
        assert set(zip(km.in_idx[k].tolist(), km.out_idx[k].tolist())) == ref
    assert km.parent.tolist() == [row[(b, x // 2, y // 2, z // 2)] for b, x, y, z in cc.tolist()]


@pytest.mark.parametrize("device", DEVICES)
def test_lookup_brute_force(device):
    table = random_coords(2000, lo=-50, hi=50, seed=6)
    query = torch.cat([table[torch.randperm(len(table))[:500]], random_coords(1500, lo=-60, hi=60, seed=7)])
    where = {tuple(r): i for i, r in enumerate(table.tolist())}
    assert lookup(query.to(device), table.to(device)).tolist() == [where.get(tuple(r), -1) for r in query.tolist()]
    assert lookup(query[:0], table).shape == (0,)
    assert (lookup(query, table[:0]) == -1).all()


def reference_conv(feats, kernel, km, transposed=False):
    "Plain per-offset gather -> matmul -> index_add_ (autograd does the backward)."
    src, dst, n = (km.out_idx, km.in_idx, km.n_in) if transposed else (km.in_idx, km.out_idx, km.n_out)
    out = feats.new_zeros(n, kernel.shape[2])
    for k in range(len(src)):
        out = out.index_add(0, dst[k], feats[src[k]] @ kernel[k])
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [37, 1000, 16384])
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_blocked_engine_matches_reference(block, order, device, monkeypatch):
    monkeypatch.setattr(msm.kernel_maps, "_BLOCK_PAIRS", block)
    cc = random_coords(800, lo=-7, hi=7, seed=16).to(device)
    if order == "sorted":
        cc = torch.unique(cc, dim=0).int()
    cases = [(kernel_map(cc, 3), False, 5, 6), (kernel_map(cc, 5), False, 3, 4)]
    _, dkm = downsample(cc)
    cases += [(dkm, False, 5, 6), (dkm, True, 6, 5)]
    part = torch.unique(torch.cat([cc[:, :1], torch.div(cc[:, 1:], 2, rounding_mode="floor")], 1), dim=0)[::2].int()
    cases.append((msm.sparse._reparent(dkm, part), True, 6, 5))  # some fine voxels without a parent
    for km, tr, cin, cout in cases:
        n_in = km.n_out if tr else km.n_in
        f = torch.randn(n_in, cin, dtype=torch.float64, device=device, requires_grad=True)
        w = torch.randn(len(km.offsets), cin, cout, dtype=torch.float64, device=device, requires_grad=True)
        b = torch.randn(cout, dtype=torch.float64, device=device, requires_grad=True)
        go = torch.randn(km.n_in if tr else km.n_out, cout, dtype=torch.float64, device=device)
        got = sparse_conv(f, w, km, b, transposed=tr)
        grads = torch.autograd.grad(got, (f, w, b), go)
        ref = reference_conv(f, w, km, tr) + b
        ref_grads = torch.autograd.grad(ref, (f, w, b), go)
        torch.testing.assert_close(got, ref)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a, r)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_conv_function(device):
    cc = random_coords(40, batch=2, lo=-3, hi=3, seed=8).to(device)
    opts = dict(dtype=torch.float64, device=device, requires_grad=True)
    f = torch.randn(len(cc), 3, **opts)
    for ks in (3, 5):
        w = torch.randn(ks**3, 3, 2, **opts)
        b = torch.randn(2, **opts)
        km = kernel_map(cc, ks)
        assert torch.autograd.gradcheck(lambda f, w, b, km=km: sparse_conv(f, w, km, b), (f, w, b))
    _, dkm = downsample(cc)
    w = torch.randn(8, 3, 2, **opts)
    assert torch.autograd.gradcheck(lambda f, w: sparse_conv(f, w, dkm), (f, w))
    fc = torch.randn(dkm.n_out, 2, **opts)
    wt = torch.randn(8, 2, 3, **opts)
    assert torch.autograd.gradcheck(lambda f, w: sparse_conv(f, w, dkm, transposed=True), (fc, wt))


def test_gradcheck_modules_double():
    cc = random_coords(30, batch=2, lo=-3, hi=3, seed=9)
    x = SparseTensor(torch.randn(len(cc), 3, dtype=torch.float64), cc)
    net = [Conv3d(3, 4, 3, bias=True).double(), Conv3d(4, 2, 2, stride=2).double(),
           Conv3d(2, 3, 2, stride=2, transposed=True, bias=True).double()]

    def run(f, *weights):
        y = x.replace_feats(f)
        y = net[0](y)
        return net[2](net[1](y)).feats

    f = x.feats.clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (f,))
    assert torch.autograd.gradcheck(lambda k: sparse_conv(f.detach(), k, kernel_map(cc, 3)),
                                    (net[0].kernel.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("device", DEVICES)
def test_transposed_restores_finer_set(device):
    cc = random_coords(300, seed=10).to(device)
    x = SparseTensor(torch.randn(len(cc), 4, device=device), cc)
    down, up = Conv3d(4, 4, 2, 2).to(device), Conv3d(4, 4, 2, 2, transposed=True).to(device)
    x_s2 = down(x)
    x_s4 = Conv3d(4, 4, 2, 2).to(device)(x_s2)
    back_s2 = Conv3d(4, 4, 2, 2, transposed=True).to(device)(x_s4)
    assert back_s2.coords is x_s2.coords
    back = up(back_s2)
    assert back.coords is x.coords
    # explicit target (tensor or coords) and a coarse input in another row order give the same features
    ref = up(x_s2).feats
    torch.testing.assert_close(up(x_s2, target=x).feats, ref)
    torch.testing.assert_close(up(x_s2, target=x.coords.clone()).feats, ref)
    perm = torch.randperm(len(x_s2), device=device)
    shuffled = SparseTensor(x_s2.feats[perm], x_s2.coords[perm], stride=2, cache=x.cache)
    torch.testing.assert_close(up(shuffled).feats, ref)
    # a coarse set missing some parents: those fine voxels get only the bias (zero here)
    part = SparseTensor(x_s2.feats[:10], x_s2.coords[:10], stride=2)
    out = up(part, target=x)
    has_parent = lookup(torch.cat([cc[:, :1], torch.div(cc[:, 1:], 2, rounding_mode="floor")], 1), part.coords) >= 0
    assert (out.feats[~has_parent] == 0).all()
    torch.testing.assert_close(out.feats[has_parent], ref[has_parent])


def test_cache_is_per_voxel_set():
    cc = random_coords(200, seed=11)
    x = SparseTensor(torch.randn(len(cc), 4), cc)
    conv = Conv3d(4, 4, 3)
    conv(x)
    sub = SparseTensor(x.feats[:100], x.coords[:100], cache=x.cache)  # another voxel set, same cache
    ref = Conv3d.forward(conv, SparseTensor(x.feats[:100], x.coords[:100].clone()))
    torch.testing.assert_close(conv(sub).feats, ref.feats)
    assert x.cache.kmaps[(1, 3, 1)].in_coords is x.coords


def test_bad_input_messages():
    cc = random_coords(20, seed=12)
    with pytest.raises(MSMError, match="must hold integers"):
        SparseTensor(torch.randn(20, 2), cc.double())
    with pytest.raises(MSMError, match=r"shape \(M, 4\)"):
        SparseTensor(torch.randn(20, 2), cc[:, 1:])
    with pytest.raises(MSMError, match="length mismatch"):
        SparseTensor(torch.randn(19, 2), cc)
    with pytest.raises(MSMError, match="duplicate"):
        SparseTensor(torch.randn(21, 2), torch.cat([cc, cc[:1]]))
    with pytest.raises(MSMError, match="batch index"):
        SparseTensor(torch.randn(20, 2), cc - torch.tensor([5, 0, 0, 0], dtype=torch.int32))
    with pytest.raises(MSMError, match="Conv3d supports"):
        Conv3d(2, 2, 3, stride=2)
    with pytest.raises(MSMError, match="no voxel set of stride 2"):
        Conv3d(2, 2, 2, 2, transposed=True)(SparseTensor(torch.randn(20, 2), cc, stride=4))
    with pytest.raises(MSMError, match="unknown sparse backend"):
        with sparse_backend("mkl"):
            pass


def test_droppath_and_rmsnorm():
    cc = random_coords(500, batch=4, seed=13)
    x = SparseTensor(torch.ones(len(cc), 3), cc)
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    out = dp(x).feats
    for b in range(4):
        vals = out[cc[:, 0] == b].unique().tolist()
        assert vals in ([0.0], [2.0])
    n = RMSNorm(3)
    f = torch.full((2, 3), 1e-5)
    torch.testing.assert_close(n(f), f / (1e-5 + 1e-4))  # eps outside the root
    z = torch.zeros(2, 3, requires_grad=True)  # an all-zero row (e.g. an empty mask token) must not give NaN gradients
    n(z).sum().backward()
    assert torch.isfinite(z.grad).all()


# --- peers -------------------------------------------------------------------------------------------------------

def _spconv_weight(kernel, ks):
    "(K, C_in, C_out) in our offset order -> spconv's (C_out, kx, ky, kz, C_in)."
    w = kernel.reshape(ks, ks, ks, kernel.shape[1], kernel.shape[2])
    return (w.permute(4, 2, 1, 0, 3) if ks % 2 else w.permute(4, 0, 1, 2, 3)).contiguous()


def test_equal_to_spconv_cpu():
    spconv = pytest.importorskip("spconv.pytorch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spconv's CPU scatter is racy with more threads
    try:
        cc = random_coords(3000, batch=2, lo=0, hi=30, seed=14)
        feats = torch.randn(len(cc), 8)
        x = SparseTensor(feats, cc)
        subm, down = Conv3d(8, 16, 3), Conv3d(16, 12, 2, 2, bias=True)
        up = Conv3d(12, 8, 2, 2, transposed=True, bias=True)
        x1 = subm(x)
        x2 = down(x1)
        x3 = up(x2)
        s_subm = spconv.SubMConv3d(8, 16, 3, bias=False, indice_key="subm")
        s_down = spconv.SparseConv3d(16, 12, 2, stride=2, bias=True, indice_key="down")
        s_up = spconv.SparseInverseConv3d(12, 8, 2, bias=True, indice_key="down")
        with torch.no_grad():
            s_subm.weight.copy_(_spconv_weight(subm.kernel, 3))
            s_down.weight.copy_(_spconv_weight(down.kernel, 2))
            s_down.bias.copy_(down.bias)
            s_up.weight.copy_(_spconv_weight(up.kernel, 2))
            s_up.bias.copy_(up.bias)
            st = spconv.SparseConvTensor(feats, cc, [30, 30, 30], 2)
            y1 = s_subm(st)
            y2 = s_down(y1)
            y3 = s_up(y2)
        torch.testing.assert_close(y1.features, x1.feats.detach(), atol=1e-4, rtol=1e-4)
        row = lookup(y2.indices, x2.coords)
        assert (row >= 0).all() and len(row) == len(x2)
        torch.testing.assert_close(y2.features, x2.feats.detach()[row], atol=1e-4, rtol=1e-4)
        row3 = lookup(y3.indices, x3.coords)
        assert (row3 >= 0).all() and len(row3) == len(x3)
        torch.testing.assert_close(y3.features, x3.feats.detach()[row3], atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.cuda
def test_equal_to_torchsparse_cuda():
    pytest.importorskip("torchsparse")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cc = random_coords(3000, batch=2, lo=0, hi=40, seed=15).cuda()
    x = SparseTensor(torch.randn(len(cc), 16, device="cuda"), cc)
    layers = [Conv3d(16, 16, 3), Conv3d(16, 32, 2, 2, bias=True), Conv3d(32, 16, 2, 2, transposed=True, bias=True)]
    layers = [m.cuda() for m in layers]
    outs = {}
    for name in ("torch", "torchsparse"):
        y = SparseTensor(x.feats, x.coords.clone())
        with sparse_backend(name):
            y1 = layers[0](y)
            y2 = layers[1](y1)
            y3 = layers[2](y2)
        outs[name] = (y1, y2, y3)
    for a, b in zip(outs["torch"], outs["torchsparse"]):
        assert torch.equal(a.coords, b.coords)
        torch.testing.assert_close(a.feats, b.feats, atol=1e-3, rtol=1e-3)


def test_offsets_order_matches_torchsparse_convention():
    # odd kernels: x fastest (z outermost); even kernels: z fastest (torchsparse get_kernel_offsets)
    odd = [[x, y, z] for z in (-1, 0, 1) for y in (-1, 0, 1) for x in (-1, 0, 1)]
    even = [[x, y, z] for x, y, z in itertools.product((0, 1), repeat=3)]
    assert kernel_offsets(3).tolist() == odd and kernel_offsets(2).tolist() == even


def test_autocast_bfloat16_cpu():
    cc = random_coords(2000, batch=2, lo=0, hi=20, seed=17)
    f = torch.randn(len(cc), 16, requires_grad=True)
    net = [Conv3d(16, 8, 3, bias=True), Conv3d(8, 8, 2, 2), Conv3d(8, 4, 2, 2, transposed=True)]

    def run(x):
        return net[2](net[1](net[0](x))).feats

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(SparseTensor(f, cc))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert f.grad.dtype == torch.float32 and net[0].kernel.grad.dtype == torch.float32
    ref = run(SparseTensor(f.detach(), cc))
    assert (y.float() - ref).abs().max() / ref.abs().max() < 0.02
