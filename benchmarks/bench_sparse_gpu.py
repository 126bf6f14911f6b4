"""Sparse convolution on a CUDA GPU: msm's two engines against torchsparse and spconv, same voxels and weights.

msm runs its pure-PyTorch engine ("msm", backend "torch", the reference) and, when Triton is importable, its fused
Triton kernels ("msm triton", backend "triton"). Scenes are synthetic rooms at 2 cm (about 90k voxels each, see
bench_sparse.py); "90k" is one room and "900k" a batch of ten. For each size and layer (32->32 submanifold 3x3x3, 32->64
kernel-2 stride-2 down, 64->32 transposed back) it times forward and forward+backward with the kernel map cached, and
the "cold" forward (map built from scratch), as medians of CUDA-event timings after a warm-up. Peers run when
importable: torchsparse 2.1 (built from source, see the README's GPU section) and spconv (`spconv-cu12x` wheels). Every
output is checked against the PyTorch engine's (max abs error, rows aligned by coordinate).

Usage: python benchmarks/bench_sparse_gpu.py [--repeats 20] [--rooms 1 10] [--dtype float32|bfloat16]
       python benchmarks/bench_sparse_gpu.py --device cpu --rooms 1 --repeats 2   # smoke test of the script only
The last line printed is one JSON object (speedup = other time / msm torch-engine time, above 1 = msm faster; and
`best_msm_vs_fastest_peer`: the fastest peer's time / the faster msm engine's, per layer).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sparse import spconv_weight, synthetic_room, voxel_coords  # noqa: E402

from msm.fused_conv import triton_available  # noqa: E402
from msm.sparse import Conv3d, SparseTensor, sparse_backend  # noqa: E402


def batch_coords(n_rooms: int, points: int = 100_000) -> torch.Tensor:
    "Voxels [b, x, y, z] int32 of n_rooms different synthetic rooms."
    out = []
    for b in range(n_rooms):
        c = voxel_coords(synthetic_room(points, seed=b))
        c[:, 0] = b
        out.append(c)
    return torch.cat(out)


def cuda_median_ms(fn, repeats: int, warmup: int = 3) -> float:
    "Median of CUDA-event timings of fn() in ms (wall-clock timings when CUDA is not in use: smoke tests)."
    if not torch.cuda.is_available() or _DEVICE.type != "cuda":
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(ts)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def _layers(dev, dtype):
    torch.manual_seed(0)
    subm = Conv3d(32, 32, 3).to(dev)
    down = Conv3d(32, 64, 2, stride=2, bias=True).to(dev)
    up = Conv3d(64, 32, 2, stride=2, bias=True, transposed=True).to(dev)
    return {"subm": subm, "down": down, "up": up}


_DEVICE = torch.device("cuda")


def _autocast(dtype):
    return torch.autocast(_DEVICE.type, dtype=dtype, enabled=dtype != torch.float32)


def bench_ours(coords, feats, layers, repeats, dtype, backend="torch"):
    "Times of msm.sparse layers on `backend`: dict layer -> (fwd, fwd+bwd, cold) ms, and outputs for the checks."
    res, outs = {}, {}
    x = SparseTensor(feats, coords, check=False)
    with _autocast(dtype), sparse_backend(backend):
        y_sub = layers["subm"](x)
        y_down = layers["down"](x)
        y_up = layers["up"](y_down)
    outs = {"subm": y_sub.feats.float(), "down": y_down.feats.float(), "up": y_up.feats.float(), "down_coords": y_down.coords}

    def run(name, inp, cold=False, backward=False):
        def fn():
            xi = SparseTensor(inp.feats, inp.coords, inp.stride, check=False) if cold else inp
            with torch.set_grad_enabled(backward), _autocast(dtype), sparse_backend(backend):
                y = layers[name](xi)
            if backward:
                y.feats.float().sum().backward()
        return fn

    xg = SparseTensor(feats.clone().requires_grad_(True), coords, check=False)
    with sparse_backend(backend):
        yd = layers["down"](xg)
    yd_in = yd.replace_feats(yd.feats.detach().clone().requires_grad_(True))
    for name, inp in (("subm", xg), ("down", xg), ("up", yd_in)):
        fwd = cuda_median_ms(run(name, inp), repeats)
        fb = cuda_median_ms(run(name, inp, backward=True), repeats)
        cold = cuda_median_ms(run(name, inp, cold=True), repeats) if name != "up" else float("nan")
        res[name] = (fwd, fb, cold)
    return res, outs


def bench_torchsparse(coords, feats, layers, repeats, dtype):
    import torchsparse
    import torchsparse.nn as spnn
    ts = {"subm": spnn.Conv3d(32, 32, 3), "down": spnn.Conv3d(32, 64, 2, stride=2, bias=True),
          "up": spnn.Conv3d(64, 32, 2, stride=2, bias=True, transposed=True)}
    for k, m in ts.items():
        m.to(coords.device)
        with torch.no_grad():
            m.kernel.copy_(layers[k].kernel.reshape(m.kernel.shape))
            if layers[k].bias is not None:
                m.bias.copy_(layers[k].bias)
    x = torchsparse.SparseTensor(feats, coords)
    with _autocast(dtype):
        y_sub = ts["subm"](x)
        y_down = ts["down"](x)
        y_up = ts["up"](y_down)
    outs = {"subm": (y_sub.feats.float(), y_sub.coords), "down": (y_down.feats.float(), y_down.coords),
            "up": (y_up.feats.float(), y_up.coords)}
    res = {}

    def run(name, cold=False, backward=False):
        f = feats.clone().requires_grad_(True) if backward else feats
        base = torchsparse.SparseTensor(f, coords)
        pre = ts["down"](base) if name == "up" else None

        def fn():
            xi = torchsparse.SparseTensor(f, coords) if cold else base
            inp = pre if name == "up" else xi
            with torch.set_grad_enabled(backward), _autocast(dtype):
                y = ts[name](inp)
            if backward:
                y.feats.float().sum().backward(retain_graph=name == "up")
        return fn

    for name in ("subm", "down", "up"):
        res[name] = (cuda_median_ms(run(name), repeats), cuda_median_ms(run(name, backward=True), repeats),
                     cuda_median_ms(run(name, cold=True), repeats) if name != "up" else float("nan"))
    return res, outs, torchsparse.__version__


def bench_spconv(coords, feats, layers, repeats, dtype):
    "Times of spconv's layers (same weights; `spconv-cu12x`), as bench_torchsparse."
    import spconv
    import spconv.pytorch as sp
    if coords.device.type == "cpu":  # smoke test: spconv's CPU backward asks for a CUDA stream otherwise
        import spconv.pytorch.ops as spconv_ops
        spconv_ops.get_current_stream = lambda: 0
        torch.set_num_threads(1)  # spconv's CPU scatter is racy with several threads (see bench_sparse.py)
    shape = [v + v % 2 for v in (coords[:, 1:].max(0).values + 1).tolist()]  # even: spconv drops voxels past it
    n_scenes = int(coords[:, 0].max()) + 1
    mods = {"subm": sp.SubMConv3d(32, 32, 3, bias=False, indice_key="subm"),
            "down": sp.SparseConv3d(32, 64, 2, stride=2, bias=True, indice_key="down"),
            "up": sp.SparseInverseConv3d(64, 32, 2, bias=True, indice_key="down")}
    for name, m in mods.items():
        m.to(coords.device)
        with torch.no_grad():
            m.weight.copy_(spconv_weight(layers[name].kernel, layers[name].kernel_size))
            if layers[name].bias is not None:
                m.bias.copy_(layers[name].bias)

    def tensor(f):
        return sp.SparseConvTensor(f, coords, shape, n_scenes)

    base = tensor(feats)
    with _autocast(dtype):
        y_sub, y_down = mods["subm"](base), mods["down"](base)
        y_up = mods["up"](y_down)
    outs = {"subm": (y_sub.features.float(), y_sub.indices), "down": (y_down.features.float(), y_down.indices),
            "up": (y_up.features.float(), y_up.indices)}

    def run(name, cold=False, backward=False):
        f = feats.clone().requires_grad_(True) if backward else feats
        xb = tensor(f)
        pre = mods["down"](xb) if name == "up" else None

        def fn():
            inp = pre if name == "up" else (tensor(f) if cold else xb)
            with torch.set_grad_enabled(backward), _autocast(dtype):
                y = mods[name](inp)
            if backward:
                y.features.float().sum().backward(retain_graph=name == "up")
        return fn

    res = {name: (cuda_median_ms(run(name), repeats), cuda_median_ms(run(name, backward=True), repeats),
                  cuda_median_ms(run(name, cold=True), repeats) if name != "up" else float("nan")) for name in mods}
    return res, outs, spconv.__version__


def _match(ours_feats, ours_coords, peer_feats, peer_coords):
    "Max abs difference after aligning the peer's rows to ours by coordinate."
    ours_feats, peer_feats = ours_feats.detach(), peer_feats.detach()
    from msm.sparse import lookup
    idx = lookup(ours_coords.int(), peer_coords.int())
    if (idx < 0).any():
        return float("inf")
    return float((ours_feats - peer_feats[idx]).abs().max())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rooms", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke test of this script)")
    a = ap.parse_args()
    global _DEVICE
    _DEVICE = torch.device(a.device)
    if _DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        print(json.dumps({"cuda": False}))
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, a.dtype)
    dev = _DEVICE
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke test, not a measurement)"
    print(f"device {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, dtype {a.dtype}")
    layers = _layers(dev, dtype)
    summary = {"gpu": name, "torch": torch.__version__, "dtype": a.dtype, "sizes": {}}
    engines = ["torch"] + (["triton"] if triton_available() and dev.type == "cuda" else [])
    for n_rooms in a.rooms:
        coords = batch_coords(n_rooms).to(dev)
        feats = torch.randn(len(coords), 32, device=dev)
        key = f"{len(coords) // 1000}k"
        ours, o_out = bench_ours(coords, feats, layers, a.repeats, dtype)
        rows = {"msm": ours}
        err = {}
        peers = {"triton": (bench_ours, ("triton",)), "torchsparse": (bench_torchsparse, ()), "spconv": (bench_spconv, ())}
        for lib, (bench, extra) in peers.items():
            if lib == "triton" and "triton" not in engines:
                continue
            try:
                got = bench(coords, feats, layers, a.repeats, dtype, *extra)
            except ImportError:
                continue
            except Exception as e:  # a peer that fails on this machine is reported, not fatal
                print(f"{lib}: failed ({type(e).__name__}: {str(e)[:200]})")
                summary.setdefault("failed", {})[lib] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            if lib == "triton":
                res, p_out = got
                rows["msm triton"] = res
                err[lib] = {n: _match(o_out[n], c, p_out[n], p_c) for n, c, p_c in
                            (("subm", coords, coords), ("down", o_out["down_coords"], p_out["down_coords"]),
                             ("up", coords, coords))}
            else:
                res, p_out, ver = got
                rows[f"{lib} {ver}"] = res
                err[lib] = {"subm": _match(o_out["subm"], coords, *p_out["subm"]),
                            "down": _match(o_out["down"], o_out["down_coords"], *p_out["down"]),
                            "up": _match(o_out["up"], coords, *p_out["up"])}
        print(f"\n{len(coords):,} voxels ({n_rooms} room(s)); ms, median of {a.repeats}")
        print(f"{'layer':6s} {'library':22s} {'fwd':>8s} {'fwd+bwd':>8s} {'cold':>8s}")
        for lib, r in rows.items():
            for name, (f, fb, c) in r.items():
                print(f"{name:6s} {lib:22s} {f:8.2f} {fb:8.2f} {c:8.2f}")
        if err:
            print("max |peer - msm|:", json.dumps(err))
        summary["sizes"][key] = {"voxels": len(coords), "ms": {lib: r for lib, r in rows.items()}, "max_err": err}
        for lib, r in rows.items():
            if lib != "msm":
                summary["sizes"][key][f"speedup_vs_{lib.replace('msm ', '').split()[0]}"] = {
                    n: {"fwd": r[n][0] / ours[n][0], "fwd_bwd": r[n][1] / ours[n][1]} for n in ours}
        peer_rows = [r for lib, r in rows.items() if not lib.startswith("msm")]
        if peer_rows:  # the bar: the faster msm engine within 2x of the fastest peer, fwd+bwd
            best = {n: min(r[n][1] for lib, r in rows.items() if lib.startswith("msm")) for n in ours}
            summary["sizes"][key]["best_msm_vs_fastest_peer"] = {
                n: min(r[n][1] for r in peer_rows) / best[n] for n in ours}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
