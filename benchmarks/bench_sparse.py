"""Sparse convolution on CPU: msm.sparse (pure PyTorch) against spconv's CPU build, same voxels, same weights, 1 thread.

A synthetic room (floor, four walls, boxes; about 100k points at 2 cm -> about 90k voxels) goes through three layers:
a 32 -> 32 submanifold 3x3x3 convolution, a 32 -> 64 kernel-2 stride-2 down-sampling convolution and the 64 -> 32
transposed convolution back onto the finer voxels. For each layer we time the forward pass and forward + backward
with the kernel map cached, and the "cold" forward (kernel map built from scratch, as on the first layer of a
level); medians of repeated runs after a warm-up. Both libraries run with ONE thread: spconv's CPU scatter is racy
with more threads, so this is the only setting where it is correct.

Peak memory of forward + backward is measured with torch.profiler's allocator events (profile_memory=True): the
running sum of every CPU allocation and free made while the layer runs forward and backward; peak = tensors alive
before (input features, weights, output gradient) + the highest running sum. It is compared with the tensors that
must exist anyway: inputs (features, output gradient), weights, outputs (output, input gradient, weight gradient).
The cached kernel map is reported separately (it is built once per level and shared by all its layers).

Usage: python benchmarks/bench_sparse.py [--points 100000] [--repeats 15] [--no-spconv]
The last line printed is one JSON object with the figures (speedup = spconv time / ours, above 1 = faster).
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from msm.sparse import Conv3d, SparseTensor, kernel_map, lookup


def synthetic_room(n_points: int = 100_000, seed: int = 0) -> np.ndarray:
    "Points (N, 3) in metres sampled on a room's surfaces: floor, four walls and six boxes, with 5 mm noise."
    rng = np.random.default_rng(seed)
    L, W, H = 6.0, 5.0, 2.8
    quads = [((0, 0, 0), (L, 0, 0), (0, W, 0)),  # (origin, u, v): floor
             ((0, 0, 0), (L, 0, 0), (0, 0, H)), ((0, W, 0), (L, 0, 0), (0, 0, H)),
             ((0, 0, 0), (0, W, 0), (0, 0, H)), ((L, 0, 0), (0, W, 0), (0, 0, H))]
    for _ in range(6):  # boxes: a top and four sides each
        o = np.array([rng.uniform(0.3, L - 1.3), rng.uniform(0.3, W - 1.3), 0.0])
        sx, sy, sz = rng.uniform(0.3, 1.0, 3)
        quads += [(o + [0, 0, sz], (sx, 0, 0), (0, sy, 0)), (o, (sx, 0, 0), (0, 0, sz)),
                  (o + [0, sy, 0], (sx, 0, 0), (0, 0, sz)), (o, (0, sy, 0), (0, 0, sz)),
                  (o + [sx, 0, 0], (0, sy, 0), (0, 0, sz))]
    o, u, v = (np.array([q[i] for q in quads], dtype=np.float64) for i in range(3))
    area = np.linalg.norm(np.cross(u, v), axis=1)
    pick = rng.choice(len(quads), n_points, p=area / area.sum())
    a, b = rng.random((2, n_points, 1))
    return (o[pick] + a * u[pick] + b * v[pick] + rng.normal(0, 0.005, (n_points, 3))).astype(np.float32)


def voxel_coords(points: np.ndarray, voxel_size: float = 0.02) -> torch.Tensor:
    "Unique voxels [0, x, y, z] int32 (M, 4), sorted by (x, y, z) as a unique-based grid sampler gives them."
    grid = np.floor(points / voxel_size).astype(np.int64)
    grid = np.unique(grid - grid.min(0), axis=0)
    return torch.from_numpy(np.concatenate([np.zeros((len(grid), 1), np.int64), grid], 1)).int()


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    "Median ms of each callable, timed in interleaved rounds (one call of each per round) so load hits all alike."
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def peak_bytes(fn) -> int:
    "Highest running sum of CPU allocations minus frees while fn() runs (torch.profiler allocator events)."
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    run = peak = 0
    for _, n in events:
        run += n
        peak = max(peak, run)
    return peak


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def kmap_bytes(km) -> int:
    "Bytes of a map's pair lists and everything derived from them (plans, and tables kept beside them)."
    derived = [nbytes(p) if isinstance(p, torch.Tensor) else nbytes(p.src) + sum(nbytes(b[5], b[6]) for b in p.blocks)
               for p in km._plans.values()]
    return nbytes(*km.in_idx, *km.out_idx) + sum(derived)


def spconv_weight(kernel: torch.Tensor, ks: int) -> torch.Tensor:
    "(K, C_in, C_out) in torchsparse offset order -> spconv's (C_out, kx, ky, kz, C_in)."
    w = kernel.detach().reshape(ks, ks, ks, kernel.shape[1], kernel.shape[2])
    return (w.permute(4, 2, 1, 0, 3) if ks % 2 else w.permute(4, 0, 1, 2, 3)).contiguous()


def prepare(layer, n_out, feats, fwd, forward, cold):
    "Callables for the timings ('fwd' without grad, 'fwd+bwd', 'cold' when given) and the peak-memory ratio."
    gy = torch.randn(n_out, layer.out_channels)

    def fwd_bwd():
        feats.grad = None
        for p in layer.parameters():
            p.grad = None
        y = forward(feats)
        y.backward(gy)
        return y

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    fns = {"fwd": no_grad(fwd), "fwd+bwd": fwd_bwd}
    if cold is not None:
        fns["cold"] = no_grad(cold)
    fwd_bwd()
    weights = list(layer.parameters())
    live_before = nbytes(feats, gy, *weights)  # alive before the call
    must = live_before + nbytes(fwd_bwd(), feats.grad, *[p.grad for p in weights])  # + output and gradients
    return fns, (live_before + peak_bytes(fwd_bwd)) / must


def _import_spconv():
    try:
        import spconv.pytorch as spconv
        import spconv.pytorch.ops as spconv_ops
    except ImportError:
        print("spconv not installed: measuring msm.sparse only")
        return None
    spconv_ops.get_current_stream = lambda: 0  # its CPU backward asks for a CUDA stream (fails on CPU-only torch)
    return spconv


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-spconv", action="store_true", help="measure msm.sparse only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    coords = voxel_coords(synthetic_room(args.points, args.seed))
    M = len(coords)
    x_feats = torch.randn(M, 32)
    subm = Conv3d(32, 32, 3)
    down = Conv3d(32, 64, 2, stride=2, bias=True)
    up = Conv3d(64, 32, 2, stride=2, bias=True, transposed=True)
    x = SparseTensor(x_feats, coords)
    with torch.no_grad():
        x_s2 = down(x)
    km = kernel_map(coords, 3)
    print(f"synthetic room: {args.points} points -> {M} voxels at 2 cm, {len(x_s2)} at stride 2; "
          f"3x3x3 map: {km.n_pairs} pairs ({km.n_pairs / M:.2f} per voxel); torch {torch.__version__}, 1 thread")

    rows, fig = [], {"voxels": M, "voxels_s2": len(x_s2), "pairs_3x3x3": km.n_pairs}
    ours = {"subm 3x3x3 32->32": (subm, x, M), "down 2x2x2 s2 32->64": (down, x, len(x_s2)),
            "transposed 2x2x2 64->32": (up, x_s2, M)}
    fns, mem = {}, {}
    for name, (layer, inp, n_out) in ours.items():
        feats = inp.feats.detach().clone().requires_grad_()
        fns[name, "msm"], mem[name, "msm"] = prepare(
            layer, n_out, feats,
            fwd=lambda layer=layer, inp=inp: layer(inp),
            forward=lambda f, layer=layer, inp=inp: layer(SparseTensor._derived(f, inp.coords, inp.stride, inp.cache)).feats,
            cold=None if layer is up else lambda layer=layer, inp=inp: layer(
                SparseTensor(inp.feats, inp.coords.clone(), stride=inp.stride, check=False)))

    peers = {}  # spconv, same voxels and weights
    spconv = None if args.no_spconv else _import_spconv()
    if spconv is not None:
        shape = [v + v % 2 for v in (coords[:, 1:].max(0).values + 1).tolist()]  # even: spconv drops voxels past it
        s_subm = spconv.SubMConv3d(32, 32, 3, bias=False, indice_key="subm")
        s_down = spconv.SparseConv3d(32, 64, 2, stride=2, bias=True, indice_key="down")
        s_up = spconv.SparseInverseConv3d(64, 32, 2, bias=True, indice_key="down")
        with torch.no_grad():
            s_subm.weight.copy_(spconv_weight(subm.kernel, 3))
            s_down.weight.copy_(spconv_weight(down.kernel, 2))
            s_down.bias.copy_(down.bias)
            s_up.weight.copy_(spconv_weight(up.kernel, 2))
            s_up.bias.copy_(up.bias)
            st = spconv.SparseConvTensor(x_feats, coords, shape, 1)
            s1, s2 = s_subm(st), s_down(st)
            row2 = lookup(s2.indices, x_s2.coords)  # spconv orders its coarse voxels its own way
            assert len(row2) == len(x_s2) and bool((row2 >= 0).all())
            st2 = s2.replace_feature(x_s2.feats[row2])
            s3 = s_up(st2)
            err = {"subm": (s1.features - subm(x).feats).abs().max().item(),
                   "down": (s2.features - x_s2.feats[row2]).abs().max().item(),
                   "transposed": (s3.features - up(x_s2).feats[lookup(s3.indices, coords)]).abs().max().item()}
        theirs = {"subm 3x3x3 32->32": (s_subm, st, M), "down 2x2x2 s2 32->64": (s_down, st, len(x_s2)),
                  "transposed 2x2x2 64->32": (s_up, st2, M)}
        for name, (layer, base, n_out) in theirs.items():
            feats = base.features.detach().clone().requires_grad_()
            fns[name, "spconv"], mem[name, "spconv"] = prepare(
                layer, n_out, feats,
                fwd=lambda layer=layer, base=base: layer(base),
                forward=lambda f, layer=layer, base=base: layer(base.replace_feature(f)).features,
                cold=None if layer is s_up else lambda layer=layer: layer(
                    spconv.SparseConvTensor(x_feats, coords, shape, 1)))

    libs = ["msm", "spconv"] if spconv is not None else ["msm"]
    load = os.getloadavg()[0]
    for name in ours:
        r = {lib: {} for lib in libs}
        for key in fns[name, "msm"]:
            got = interleaved_medians({lib: fns[name, lib][key] for lib in libs}, args.repeats)
            for lib in libs:
                r[lib][key] = got[lib]
        rows.append((name, dict(r["msm"], peak_mem_ratio=mem[name, "msm"])))
        if spconv is not None:
            peers[name] = dict(r["spconv"], peak_mem_ratio=mem[name, "spconv"], max_abs_err=err[name.split()[0]])
    load = max(load, os.getloadavg()[0])

    print()
    print(f"{'layer':26s} {'measure':8s} {'msm ms':>9s} {'spconv ms':>10s} {'speedup':>8s}")
    for name, r in rows:
        p = peers.get(name, {})
        for key in ("fwd", "fwd+bwd", "cold"):
            if key not in r:
                continue
            ours, peer = r[key], p.get(key)
            sp = f"{peer / ours:8.2f}" if peer else f"{'-':>8s}"
            print(f"{name:26s} {key:8s} {ours:9.1f} {peer if peer else float('nan'):10.1f} {sp}")
            slug = name.split()[0]
            fig[f"{slug}_{key.replace('+', '_')}_ms"] = round(ours, 2)
            if peer:
                fig[f"{slug}_{key.replace('+', '_')}_spconv_ms"] = round(peer, 2)
                fig[f"{slug}_{key.replace('+', '_')}_speedup"] = round(peer / ours, 3)
        fig[f"{name.split()[0]}_peak_mem_ratio"] = round(r["peak_mem_ratio"], 3)
        if p:
            fig[f"{name.split()[0]}_spconv_peak_mem_ratio"] = round(p["peak_mem_ratio"], 3)
            fig[f"{name.split()[0]}_max_abs_err_vs_spconv"] = float(f"{p['max_abs_err']:.3g}")
    print()
    print("peak memory of forward+backward / (inputs + weights + outputs + their gradients):")
    for name, r in rows:
        p = peers.get(name)
        print(f"  {name:26s} msm {r['peak_mem_ratio']:.2f}x" + (f"   spconv {p['peak_mem_ratio']:.2f}x" if p else ""))
    print(f"  cached 3x3x3 kernel map + plan: {kmap_bytes(x.cache.kmaps[(1, 3, 1)]) / 2**20:.1f} MiB "
          f"(features of one 32-channel layer: {nbytes(x_feats) / 2**20:.1f} MiB)")
    if peers:
        print("max |spconv - msm| per layer: " + ", ".join(f"{k.split()[0]} {v['max_abs_err']:.2e}" for k, v in peers.items()))
        fig["ours_ms"] = fig["subm_fwd_bwd_ms"]
        fig["peer_ms"] = fig["subm_fwd_bwd_spconv_ms"]
        fig["speedup"] = fig["subm_fwd_bwd_speedup"]
    print(f"timing: medians of {args.repeats} interleaved rounds after warm-up, 1 thread each; "
          f"1-minute load average during the run up to {load:.1f} (2 = both cores busy)")
    fig["load_avg"] = round(load, 2)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
