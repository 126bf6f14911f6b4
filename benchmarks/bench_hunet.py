"""HUNet cost: forward and forward + backward time and peak memory of the `tiny` and `ablation` presets on synthetic
scenes of 50k / 100k / 200k points, and how they grow with the number of points (ratios 200k / 50k).

A scene of N points is a row of ceil(N / 50k) furnished synthetic rooms (`msm.data.synthetic_room`, ~50k points
each, side by side), so the number of voxels grows in proportion to N rather than saturating inside one room.
Each preset voxelises at its own voxel size (4 cm for both). Forward runs in eval mode under `torch.no_grad()`;
forward + backward in train mode (drop path and attention dropout on) with the loss sum of squared outputs.
Every run builds a fresh SparseTensor, so kernel maps are built each time (as in training, where every batch is
new). Times are medians of `--repeats` runs after one warm-up. Peak memory: on CUDA `torch.cuda.max_memory_allocated`;
on CPU the growth of the process's peak resident set (VmHWM, reset before each measurement through
/proc/self/clear_refs, after `malloc_trim` has returned freed heap pages) above the resident set before the run;
that figure depends on the allocator, so `act MiB` also reports the activations autograd saves for the backward
pass of one training forward (distinct storages), which does not.

    python benchmarks/bench_hunet.py [--points 50000 100000 200000] [--presets tiny ablation] [--repeats 3]
                                     [--warmup 1] [--threads 2] [--device cpu|cuda|all] [--checkpoint]
    python benchmarks/bench_hunet.py --device cuda --presets paper --batch-search 240000 [--amp bf16]

`--batch-search N` measures training forward + backward instead on batches of 1, 2, 4, ... scenes of N points (copies
of one scene at different batch indices) until the GPU runs out of memory, and reports batch 1 and the largest batch
that fit, with time per batch, scenes per second and peak memory (`--max-batch` caps the search; on CPU it is a smoke
test of the script).

The 2-core machine this project is developed on runs the full default in about 10 minutes. Last line: one JSON
object with the figures. There is no peer in this benchmark: it measures how the cost scales (a linear model gives
ratio 4.0 for 4x the points; the `*_per_voxel_ratio` figures divide out the voxel counts).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on a shared machine

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from msm.hunet import HUNet, HUNetConfig  # noqa: E402
from msm.sparse import SparseTensor  # noqa: E402
from msm.voxelize import collate, voxelize_scene  # noqa: E402


def scene(n_points: int, per_room: int = 50_000, seed: int = 0) -> dict:
    "A row of ceil(n / per_room) synthetic rooms with n points in all."
    from msm.data import synthetic_room

    k = math.ceil(n_points / per_room)
    parts, x0 = [], 0.0
    for i in range(k):
        r = synthetic_room(seed + i, n_points=n_points // k + (i < n_points % k))
        c = r["coord"].copy()
        c[:, 0] += x0 - c[:, 0].min()
        x0 = float(c[:, 0].max()) + 1.0
        parts.append({**r, "coord": c})
    return {key: np.concatenate([p[key] for p in parts]) for key in ("coord", "color", "normal")}


def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # MiB
    return float("nan")


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS = live memory
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM
    except OSError:
        pass
    return _vm("VmRSS")


def _peak(device, base):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return _vm("VmHWM") - base


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_activations(net, feats, coords) -> float:
    "MiB of the distinct tensors autograd saves for the backward pass of one training forward (allocator-independent)."
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(SparseTensor(feats, coords))
    del out
    return sum(seen.values()) / 2**20


def measure(net, feats, coords, repeats, warmup=1):
    "Median forward / forward+backward seconds and peak MiB (a fresh SparseTensor each run: kernel maps included)."
    device = feats.device

    def fwd():
        net.eval()
        with torch.no_grad():
            net(SparseTensor(feats, coords))

    def fwd_bwd():
        net.train()
        out = net(SparseTensor(feats, coords))
        sum(o.feats.square().mean() for o in out).backward()
        del out
        net.zero_grad(set_to_none=True)

    res = {"act_mib": saved_activations(net, feats, coords)}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        res[f"{name}_s"], res[f"{name}_mib"] = timed(fn, device, repeats, warmup)
    return res


def timed(fn, device, repeats: int, warmup: int) -> tuple[float, float]:
    "Median seconds of fn() after `warmup` untimed calls, and the peak MiB of the last timed call."
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        base = _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        mem = _peak(device, base)
    return statistics.median(times), mem


def batch_search(net, vox, device, repeats, warmup, max_batch, amp) -> dict:
    "Training forward + backward on batches of 1, 2, 4, ... copies of `vox` until out of memory: {batch: figures}."
    out, b = {}, 1
    while b <= max_batch:
        batch = collate([vox] * b)
        feats, coords = batch["feats"].to(device), batch["coords"].to(device)

        def fwd_bwd(feats=feats, coords=coords):
            net.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                levels = net(SparseTensor(feats, coords))
                loss = sum(o.feats.float().square().mean() for o in levels)
            loss.backward()
            net.zero_grad(set_to_none=True)

        try:
            t, mem = timed(fwd_bwd, device, repeats, warmup)
        except torch.cuda.OutOfMemoryError:
            net.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"  batch {b}: out of memory", flush=True)
            break
        out[b] = {"voxels": len(coords), "fwd_bwd_s": round(t, 4), "scenes_per_s": round(b / t, 2),
                  "peak_mib": round(mem)}
        print(f"  batch {b:3d}: {len(coords):9d} voxels {t:8.3f} s {b / t:8.2f} scenes/s {mem:9.0f} MiB", flush=True)
        b *= 2
    return out


def networks(devices, presets, checkpoint: bool):
    "(device name, preset, config, network) for every device and preset, the same seed for each."
    for dev_name in devices:
        for preset in presets:
            cfg = replace(getattr(HUNetConfig, preset)(), checkpoint=checkpoint)
            torch.manual_seed(0)
            yield dev_name, preset, cfg, HUNet(cfg).to(torch.device(dev_name))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    ap.add_argument("--presets", nargs="+", default=["tiny", "ablation"], choices=["tiny", "ablation", "paper"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    ap.add_argument("--checkpoint", action="store_true", help="HUNetConfig.checkpoint=True (recompute blocks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    ap.add_argument("--batch-search", type=int, default=0, metavar="POINTS",
                    help="forward + backward on growing batches of scenes of POINTS points (see the docstring)")
    ap.add_argument("--max-batch", type=int, default=256, help="largest batch --batch-search tries")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"], help="--batch-search: bf16 autocast")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if a.batch_search:
        sc, summary = scene(a.batch_search), {"points": a.batch_search, "amp": a.amp, "checkpoint": a.checkpoint}
        for dev_name, preset, cfg, net in networks(devices, a.presets, a.checkpoint):
            print(f"{dev_name} {preset}, scenes of {a.batch_search} points, amp {a.amp}:", flush=True)
            res = batch_search(net, voxelize_scene(sc, cfg.voxel_size, "first"), torch.device(dev_name), a.repeats,
                               a.warmup, a.max_batch, a.amp)
            if res:
                summary[f"{dev_name}_{preset}"] = {"batch_1": res.get(1), "largest_batch": max(res),
                                                   "largest": res[max(res)]}
            del net
        print(json.dumps(summary))
        return
    scenes = {n: scene(n) for n in a.points}
    summary, rows = {"threads": a.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "checkpoint": a.checkpoint}, []
    print(f"{'device':6s} {'preset':9s} {'points':>8s} {'voxels':>8s} {'fwd s':>8s} {'fwd MiB':>8s} "
          f"{'f+b s':>8s} {'f+b MiB':>8s} {'act MiB':>8s}")
    for dev_name, preset, cfg, net in networks(devices, a.presets, a.checkpoint):
        device = torch.device(dev_name)
        per = {}
        for n, sc in scenes.items():
            vox = voxelize_scene(sc, cfg.voxel_size, "first")
            gc = vox["grid_coord"]
            coords = torch.cat([torch.zeros(len(gc), 1, dtype=torch.int32), gc], 1)
            r = measure(net, vox["feat"].to(device), coords.to(device), a.repeats, a.warmup)
            r["voxels"] = len(gc)
            per[n] = r
            rows.append((dev_name, preset, n, r))
            print(f"{dev_name:6s} {preset:9s} {n:8d} {len(gc):8d} {r['fwd_s']:8.2f} {r['fwd_mib']:8.0f} "
                  f"{r['fwd_bwd_s']:8.2f} {r['fwd_bwd_mib']:8.0f} {r['act_mib']:8.0f}", flush=True)
        lo, hi = min(per), max(per)
        key = f"{dev_name}_{preset}"
        for n, r in per.items():
            for m in ("fwd_s", "fwd_bwd_s", "fwd_bwd_mib", "act_mib"):
                summary[f"{key}_{n // 1000}k_{m}"] = round(r[m], 3)
        vr = per[hi]["voxels"] / per[lo]["voxels"]
        for m in ("fwd_s", "fwd_bwd_s", "fwd_mib", "fwd_bwd_mib", "act_mib"):
            ratio = per[hi][m] / max(per[lo][m], 1e-9)
            summary[f"{key}_{m}_ratio"] = round(ratio, 2)
            summary[f"{key}_{m}_per_voxel_ratio"] = round(ratio / vr, 2)
        summary[f"{key}_voxel_ratio"] = round(vr, 2)
        print(f"  {key}: {hi // 1000}k / {lo // 1000}k points -> voxels x{vr:.2f}, "
              + ", ".join(f"{m} x{summary[f'{key}_{m}_ratio']:.2f}"
                          for m in ("fwd_s", "fwd_bwd_s", "fwd_mib", "fwd_bwd_mib", "act_mib")),
              flush=True)
        del net
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
