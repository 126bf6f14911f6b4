"""Multi-resolution point sampling: msm.probe.sample_features (sparse 8-corner lookup, memory linear in the points)
against the official recipe (a dense grid per scene, level and 16-channel block, then grid_sample).

The peer is written here from the description in docs/PAPER.md §5 and the official-harness README: for every level with
stride L, a dense (1, 16, X, Y, Z) grid of the level's bounding box (max coordinate + 1 per axis) holding the
features of the occupied voxels and zeros elsewhere, sampled with `grid_sample(align_corners=True)` at
`(c + 0.5) / L / S * 2 - 1`. Ours runs with `align="official"`, so both compute the same numbers (checked).

The scene is the ~10 x 10 x 3 m synthetic room of bench_voxelize.py at 2 cm, five levels (strides 1..16) whose voxels
are the occupied floor(c / 2**i), random features. After a warm-up both run interleaved; medians are reported, and
on CUDA also the peak of allocated GPU memory of each (on CPU: the size of the largest dense grid the peer builds).
Last line: one JSON object (speedup = peer time / ours).

    python benchmarks/bench_probe.py [--points 200000] [--channels 16,16,16,16,16] [--repeats 3] [--threads 2]
    python benchmarks/bench_probe.py --device cuda --points 1000000 --channels 64,96,128,256,384
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_voxelize import synthetic_room  # noqa: E402

from msm.probe import sample_features  # noqa: E402
from msm.sparse import SparseTensor  # noqa: E402


def make_levels(n: int, channels, device, voxel: float = 0.02, seed: int = 0):
    "Finest grid coordinate of every point (N, 3) and 5 levels of occupied voxels with random features."
    pgc = torch.from_numpy(np.floor(synthetic_room(n, seed) / voxel).astype(np.int64))
    pgc -= pgc.min(0).values
    g = torch.Generator().manual_seed(seed)
    levels = []
    for i, c in enumerate(channels):
        vox = torch.unique(torch.div(pgc, 2**i, rounding_mode="floor"), dim=0)
        coords = torch.cat([torch.zeros(len(vox), 1, dtype=torch.long), vox], 1).int()
        levels.append(SparseTensor(torch.randn(len(vox), c, generator=g).to(device), coords.to(device), stride=2**i))
    return pgc.to(device), levels


def dense_official(levels, pgc, block: int = 16):
    "The official recipe: per level and 16-channel block a dense grid of the box, grid_sample(align_corners=True)."
    out = []
    for lv in levels:
        xyz = lv.coords[:, 1:].long()
        S = xyz.max(0).values + 1  # (3,)
        g = ((pgc.float() + 0.5) / lv.stride / S * 2 - 1).flip(-1).view(1, -1, 1, 1, 3)  # (1, N, 1, 1, 3) as (z, y, x)
        for c0 in range(0, lv.feats.shape[1], block):
            f = lv.feats[:, c0:c0 + block]
            grid = f.new_zeros(1, f.shape[1], *S.tolist())  # (1, 16, X, Y, Z): the memory hog
            grid[0, :, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = f.T
            out.append(F.grid_sample(grid, g, align_corners=True).view(f.shape[1], -1).T)
            del grid
    return torch.cat(out, 1)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return out, dt * 1e3, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--channels", default="16,16,16,16,16", help="channels per level, finest first")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    channels = [int(c) for c in a.channels.split(",")]
    pgc, levels = make_levels(a.points, channels, device)
    box = (pgc.max(0).values + 1).tolist()
    runs = {"ours": lambda: sample_features(levels, pgc, align="official"), "peer": lambda: dense_official(levels, pgc)}
    outs = {k: timed(f, device)[0] for k, f in runs.items()}  # warm-up
    diff = (outs["ours"] - outs["peer"]).abs().max().item()
    del outs
    times, peaks = {k: [] for k in runs}, {}
    for _ in range(a.repeats):
        for k, f in runs.items():
            out, ms, peak = timed(f, device)
            times[k].append(ms)
            peaks[k] = peak
            del out
    ours_ms, peer_ms = float(np.median(times["ours"])), float(np.median(times["peer"]))
    out_mb = a.points * sum(channels) * 4 / 2**20
    grid_mb = box[0] * box[1] * box[2] * 16 * 4 / 2**20
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{a.threads} threads'}), "
          f"{a.points} points, {len(levels[0])} finest voxels, box {box}, channels {channels}, output {out_mb:.0f} MB")
    print(f"{'':6s} {'median ms':>10s} {'peak alloc MB':>14s}")
    for k, ms in (("ours", ours_ms), ("peer", peer_ms)):
        print(f"{k:6s} {ms:10.1f} {peaks[k] if peaks[k] is not None else float('nan'):14.0f}")
    print(f"max |ours - peer| = {diff:.2e}; the peer's level-0 16-channel dense grid alone is {grid_mb:.0f} MB")
    print(json.dumps({"device": str(device), "points": a.points, "ours_ms": round(ours_ms, 2), "peer_ms": round(peer_ms, 2),
                      "speedup": round(peer_ms / ours_ms, 2), "ours_peak_mb": peaks["ours"], "peer_peak_mb": peaks["peer"],
                      "dense_grid_mb": round(grid_mb), "output_mb": round(out_mb), "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
