"""Synthetic room generator: floor + 4 walls + a few boxes, ~50k points with
colour (0..255, float32) and unit normals.  Saved as a torch .pth dict with
float32 torch tensors coord/color/normal (run_official.py also accepts the
official numpy-array format).

usage: python make_room.py [--n 50000] [--seed 0] [--out synthetic_room.pth]
"""
import argparse

import numpy as np
import torch


def sample_rect(rng, n, origin, u, v, normal, color_fn):
    """n points uniformly on the parallelogram origin + a*u + b*v, a,b in [0,1]."""
    ab = rng.random((n, 2))
    p = origin[None] + ab[:, :1] * u[None] + ab[:, 1:] * v[None]
    nrm = np.repeat(normal[None], n, 0)
    col = color_fn(p, ab)
    return p, col, nrm


def make_room(n_total=50000, seed=0, size=(4.0, 3.2, 2.5)):
    rng = np.random.default_rng(seed)
    X, Y, Z = size
    # surfaces: (origin, u, v, normal, base colour, pattern)
    surfaces = []
    f = np.array
    surfaces.append(("floor", f([0, 0, 0.]), f([X, 0, 0.]), f([0, Y, 0.]), f([0, 0, 1.]), (150, 120, 90), "checker"))
    surfaces.append(("wall_y0", f([0, 0, 0.]), f([X, 0, 0.]), f([0, 0, Z]), f([0, 1., 0]), (200, 200, 190), "grad"))
    surfaces.append(("wall_y1", f([0, Y, 0.]), f([X, 0, 0.]), f([0, 0, Z]), f([0, -1., 0]), (180, 210, 230), "grad"))
    surfaces.append(("wall_x0", f([0, 0, 0.]), f([0, Y, 0.]), f([0, 0, Z]), f([1., 0, 0]), (230, 200, 170), "grad"))
    surfaces.append(("wall_x1", f([X, 0, 0.]), f([0, Y, 0.]), f([0, 0, Z]), f([-1., 0, 0]), (170, 230, 170), "grad"))
    # boxes: (min corner, size, colour)
    boxes = [((0.5, 0.4, 0.0), (1.2, 0.6, 0.75), (200, 40, 40)),    # table-ish
             ((2.6, 1.8, 0.0), (0.8, 0.8, 0.45), (40, 60, 200)),    # low cabinet
             ((1.7, 2.5, 0.0), (0.4, 0.5, 1.8), (230, 200, 30)),    # tall shelf
             ((0.8, 0.6, 0.75), (0.3, 0.25, 0.2), (30, 160, 60))]   # box on the table
    for bi, (mn, sz, col) in enumerate(boxes):
        mn, sz = f(mn, dtype=float), f(sz, dtype=float)
        ex, ey, ez = f([sz[0], 0, 0]), f([0, sz[1], 0]), f([0, 0, sz[2]])
        surfaces.append((f"box{bi}_top", mn + ez, ex, ey, f([0, 0, 1.]), col, "flat"))
        surfaces.append((f"box{bi}_-y", mn, ex, ez, f([0, -1., 0]), col, "flat"))
        surfaces.append((f"box{bi}_+y", mn + ey, ex, ez, f([0, 1., 0]), col, "flat"))
        surfaces.append((f"box{bi}_-x", mn, ey, ez, f([-1., 0, 0]), col, "flat"))
        surfaces.append((f"box{bi}_+x", mn + ex, ey, ez, f([1., 0, 0]), col, "flat"))
    areas = np.array([np.linalg.norm(np.cross(s[2], s[3])) for s in surfaces])
    counts = np.floor(areas / areas.sum() * n_total).astype(int)
    counts[0] += n_total - counts.sum()
    P, C, N = [], [], []
    for (_name, o, u, v, nrm, base, pat), n in zip(surfaces, counts):
        base = np.array(base, dtype=float)

        def color_fn(p, ab, base=base, pat=pat):
            if pat == "checker":
                chk = ((np.floor(p[:, 0] / 0.5) + np.floor(p[:, 1] / 0.5)) % 2)[:, None]
                c = base[None] * (0.75 + 0.35 * chk)
            elif pat == "grad":
                c = base[None] * (0.7 + 0.3 * ab[:, 1:2])
            else:
                c = base[None] * (0.85 + 0.15 * ab[:, :1])
            return c + rng.normal(0, 6, c.shape)

        p, c, nn_ = sample_rect(rng, n, o, u, v, nrm, color_fn)
        P.append(p)
        C.append(c)
        N.append(nn_)
    coord = np.concatenate(P) + rng.normal(0, 0.002, (n_total, 3))      # 2 mm sensor noise
    color = np.clip(np.concatenate(C), 0, 255)
    normal = np.concatenate(N) + rng.normal(0, 0.02, (n_total, 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    perm = rng.permutation(n_total)                                      # no surface ordering
    coord = coord + np.array([1.3, -0.7, 0.05])                          # arbitrary offset (CenterShift removes it)
    return {"coord": torch.from_numpy(coord[perm].astype(np.float32)),
            "color": torch.from_numpy(color[perm].astype(np.float32)),
            "normal": torch.from_numpy(normal[perm].astype(np.float32))}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="synthetic_room.pth")
    a = ap.parse_args()
    scene = make_room(a.n, a.seed)
    torch.save(scene, a.out)
    print({k: (tuple(v.shape), v.dtype, float(v.min()), float(v.max())) for k, v in scene.items()})
