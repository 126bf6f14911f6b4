"""Grid sampling speed: msm.voxelize.grid_sample (train mode, torch) against a numpy GridSample in Pointcept's style.

The peer is written here from the description of Pointcept's `GridSample` (train mode): integer grid coordinates
offset by their minimum, an FNV-1 64-bit hash of each row (start from the FNV offset basis; for every coordinate
column multiply by the FNV prime, then XOR the column), an argsort of the hashes, `np.unique(return_inverse,
return_counts)` on the sorted hashes and one random point per voxel (a random offset into each run).

Both run on the same seeded ~10 x 10 x 3 m synthetic room of 1M points at 2 cm, with the same number of threads
(torch threads; numpy's sort is single-threaded anyway). After a warm-up, the implementations run interleaved and the
median of the repeated runs is reported.
The results are checked to be the same voxelisation up to voxel order: the same set of grid coordinates, and every
point mapped to the same grid coordinate. Last line: one JSON object with the figures (speedup = peer / ours).

    python benchmarks/bench_voxelize.py [--points 1000000] [--repeats 7] [--threads 2] [--voxel-size 0.02]

OpenMP threads (torch's) spin while they wait by default; on a machine shared with other jobs that spinning makes
2-thread torch ops several times slower (measured here: 50 ms -> 400 ms at load 2 on 2 cores), so this script sets
OMP_WAIT_POLICY=PASSIVE unless the environment already sets it (it is printed with the results). numpy's sort is
single-threaded and unaffected.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from msm.voxelize import grid_sample  # noqa: E402

FNV64_OFFSET = np.uint64(0xCBF29CE484222325)
FNV64_PRIME = np.uint64(0x100000001B3)


def synthetic_room(n: int, seed: int = 0) -> np.ndarray:
    "About n points (float32, metres) on the floor, ceiling and walls of a 10 x 10 x 3 m room and on 12 boxes."
    rng = np.random.default_rng(seed)
    w, d, h = 10.0, 10.0, 3.0
    # (origin, edge u, edge v) of rectangles; boxes add their top and four sides
    rects = [((0, 0, 0), (w, 0, 0), (0, d, 0)), ((0, 0, h), (w, 0, 0), (0, d, 0)),
             ((0, 0, 0), (w, 0, 0), (0, 0, h)), ((0, d, 0), (w, 0, 0), (0, 0, h)),
             ((0, 0, 0), (0, d, 0), (0, 0, h)), ((w, 0, 0), (0, d, 0), (0, 0, h))]
    for _ in range(12):
        sx, sy, sz = rng.uniform(0.4, 2.0), rng.uniform(0.4, 2.0), rng.uniform(0.4, 1.8)
        x0, y0 = rng.uniform(0.2, w - sx - 0.2), rng.uniform(0.2, d - sy - 0.2)
        rects += [((x0, y0, sz), (sx, 0, 0), (0, sy, 0)),
                  ((x0, y0, 0), (sx, 0, 0), (0, 0, sz)), ((x0, y0 + sy, 0), (sx, 0, 0), (0, 0, sz)),
                  ((x0, y0, 0), (0, sy, 0), (0, 0, sz)), ((x0 + sx, y0, 0), (0, sy, 0), (0, 0, sz))]
    o, u, v = (np.array([r[i] for r in rects], np.float64) for i in range(3))
    area = np.linalg.norm(np.cross(u, v), axis=1)
    which = rng.choice(len(rects), size=n, p=area / area.sum())
    a, b = rng.random((2, n, 1))
    pts = o[which] + a * u[which] + b * v[which] + rng.normal(0, 0.003, (n, 3))  # 3 mm sensor noise
    return pts.astype(np.float32)


def fnv1_hash(grid: np.ndarray) -> np.ndarray:
    "FNV-1 64-bit hash of each row of a non-negative (N, 3) integer array (multiply by the prime, then XOR)."
    g = grid.astype(np.uint64)
    h = np.full(len(g), FNV64_OFFSET, dtype=np.uint64)
    for j in range(g.shape[1]):
        h = h * FNV64_PRIME  # wraps modulo 2**64
        h = h ^ g[:, j]
    return h


def peer_grid_sample(coord: np.ndarray, voxel_size: float, rng: np.random.Generator):
    "Pointcept-style GridSample (train): (grid coords of kept points (M, 3), kept index (M,), inverse (N,))."
    grid = np.floor(coord.astype(np.float64) / voxel_size).astype(np.int64)
    grid -= grid.min(0)
    key = fnv1_hash(grid)
    order = np.argsort(key)
    _, run, count = np.unique(key[order], return_inverse=True, return_counts=True)
    start = np.cumsum(count) - count
    pick = start + rng.integers(0, count.max(), count.size) % count
    kept = order[pick]
    inverse = np.empty_like(run)
    inverse[order] = run
    return grid[kept], kept, inverse


def same_voxelisation(coord, voxel_size, ours, peer) -> bool:
    "Same voxel set and every point mapped to the same grid coordinate (voxel order may differ)."
    g_ours, g_peer = ours.grid_coord.numpy().astype(np.int64), peer[0]
    if len(g_ours) != len(g_peer):
        return False
    same_set = np.array_equal(np.unique(g_ours, axis=0), np.unique(g_peer, axis=0))
    same_map = np.array_equal(g_ours[ours.inverse.numpy()], g_peer[peer[2]])
    grid = np.floor(coord.astype(np.float64) / voxel_size).astype(np.int64)
    grid -= grid.min(0)
    kept_inside = (np.array_equal(grid[ours.index.numpy()], g_ours) and np.array_equal(grid[peer[1]], g_peer))
    return bool(same_set and same_map and kept_inside)


def timed(fns: dict, repeats: int) -> dict:
    "Milliseconds of every function in `fns`, run interleaved (one of each per round, so a busy spell on a shared"
    " machine hits all of them alike) after one warm-up each."
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--voxel-size", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    coord = synthetic_room(args.points, args.seed)
    coord_t = torch.from_numpy(coord)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    ours = grid_sample(coord_t, args.voxel_size, "train", gen)
    peer = peer_grid_sample(coord, args.voxel_size, rng)
    identical = same_voxelisation(coord, args.voxel_size, ours, peer)

    times = timed({"ours": lambda: grid_sample(coord_t, args.voxel_size, "train", gen),
                   "first": lambda: grid_sample(coord_t, args.voxel_size, "first"),
                   "peer": lambda: peer_grid_sample(coord, args.voxel_size, rng)}, args.repeats)
    ours_all, peer_all = times["ours"], times["peer"]
    ours_ms, first_ms, peer_ms = (float(np.median(times[k])) for k in ("ours", "first", "peer"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"grid sampling {len(coord):,} points at {args.voxel_size * 100:g} cm -> {ours.num_voxels:,} voxels, "
          f"{args.threads} torch threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), load average {load:.2f} "
          f"on {os.cpu_count()} cores")
    print(f"{'implementation':<44}{'median ms':>10}{'min ms':>9}{'max ms':>9}")
    print(f"{'msm grid_sample (torch, mode=train)':<44}{ours_ms:>10.1f}{min(ours_all):>9.1f}{max(ours_all):>9.1f}")
    print(f"{'msm grid_sample (torch, mode=first)':<44}{first_ms:>10.1f}")
    print(f"{'Pointcept-style GridSample (numpy, FNV-1)':<44}{peer_ms:>10.1f}{min(peer_all):>9.1f}{max(peer_all):>9.1f}")
    print(f"same voxel set and point-to-voxel map: {identical}; speedup (peer / ours, train): {peer_ms / ours_ms:.2f}x")
    print(json.dumps({"points": len(coord), "voxels": ours.num_voxels, "threads": args.threads,
                      "ours_ms": round(ours_ms, 2), "ours_first_ms": round(first_ms, 2), "peer_ms": round(peer_ms, 2),
                      "speedup": round(peer_ms / ours_ms, 2), "identical": identical, "load_avg": round(load, 2),
                      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}))


if __name__ == "__main__":
    main()
