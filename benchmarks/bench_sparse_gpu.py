"""Sparse convolution on a CUDA GPU: msm.sparse (pure PyTorch) against torchsparse and spconv, same voxels and weights.

Scenes are synthetic rooms at 2 cm (about 90k voxels each, see bench_sparse.py); "90k" is one room and "900k" a batch
of ten. For each size and layer (32->32 submanifold 3x3x3, 32->64 kernel-2 stride-2 down, 64->32 transposed back) it
times forward and forward+backward with the kernel map cached, and the "cold" forward (map built from scratch), as
medians of CUDA-event timings after a warm-up. Peers run when importable: torchsparse 2.1 (built from source, see the
README's GPU section) and spconv (`spconv-cu12x` wheels). Each peer's output is checked against ours (max abs error).

Usage: python benchmarks/bench_sparse_gpu.py [--repeats 20] [--rooms 1 10] [--dtype float32|bfloat16]
The last line printed is one JSON object (speedup = peer time / ours, above 1 = ours faster).
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sparse import synthetic_room, voxel_coords  # noqa: E402

from msm.sparse import Conv3d, SparseTensor  # noqa: E402


def batch_coords(n_rooms: int, points: int = 100_000) -> torch.Tensor:
    "Voxels [b, x, y, z] int32 of n_rooms different synthetic rooms."
    out = []
    for b in range(n_rooms):
        c = voxel_coords(synthetic_room(points, seed=b))
        c[:, 0] = b
        out.append(c)
    return torch.cat(out)


def cuda_median_ms(fn, repeats: int, warmup: int = 3) -> float:
    "Median of CUDA-event timings of fn() in ms."
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


def bench_ours(coords, feats, layers, repeats, dtype):
    "Times of msm.sparse layers: dict layer -> (fwd, fwd+bwd, cold) ms, and outputs for the equality checks."
    res, outs = {}, {}
    x = SparseTensor(feats, coords, check=False)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y_sub = layers["subm"](x)
        y_down = layers["down"](x)
        y_up = layers["up"](y_down)
    outs = {"subm": y_sub.feats.float(), "down": y_down.feats.float(), "up": y_up.feats.float(), "down_coords": y_down.coords}

    def run(name, inp, cold=False, backward=False):
        def fn():
            xi = SparseTensor(inp.feats, inp.coords, inp.stride, check=False) if cold else inp
            with torch.set_grad_enabled(backward), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                y = layers[name](xi)
            if backward:
                y.feats.float().sum().backward()
        return fn

    xg = SparseTensor(feats.clone().requires_grad_(True), coords, check=False)
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
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
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
            with torch.set_grad_enabled(backward), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                y = ts[name](inp)
            if backward:
                y.feats.float().sum().backward(retain_graph=name == "up")
        return fn

    for name in ("subm", "down", "up"):
        res[name] = (cuda_median_ms(run(name), repeats), cuda_median_ms(run(name, backward=True), repeats),
                     cuda_median_ms(run(name, cold=True), repeats) if name != "up" else float("nan"))
    return res, outs, torchsparse.__version__


def _match(ours_feats, ours_coords, peer_feats, peer_coords):
    "Max abs difference after aligning the peer's rows to ours by coordinate."
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
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        print(json.dumps({"cuda": False}))
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, a.dtype)
    dev = torch.device("cuda")
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, dtype {a.dtype}")
    layers = _layers(dev, dtype)
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": a.dtype, "sizes": {}}
    for n_rooms in a.rooms:
        coords = batch_coords(n_rooms).to(dev)
        feats = torch.randn(len(coords), 32, device=dev)
        key = f"{len(coords) // 1000}k"
        ours, o_out = bench_ours(coords, feats, layers, a.repeats, dtype)
        rows = {"msm": ours}
        err = {}
        try:
            tsr, t_out, ver = bench_torchsparse(coords, feats, layers, a.repeats, dtype)
            rows[f"torchsparse {ver}"] = tsr
            err["torchsparse"] = {"subm": _match(o_out["subm"], coords, *t_out["subm"]),
                                  "down": _match(o_out["down"], o_out["down_coords"], *t_out["down"]),
                                  "up": _match(o_out["up"], coords, *t_out["up"])}
        except ImportError:
            pass
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
                summary["sizes"][key][f"speedup_vs_{lib.split()[0]}"] = {
                    n: {"fwd": r[n][0] / ours[n][0], "fwd_bwd": r[n][1] / ours[n][1]} for n in ours}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
