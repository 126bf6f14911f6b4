"""Reference solutions of the course exercises in `nbs/tutorials/` (spoilers: try the exercise first).

The exercise notebooks use these only when solutions are switched on: under `nbdev-test` (which sets `IN_TEST`) or
with `MSM_SOLUTIONS=1`; see `checks.solution_or`. `tests/test_tutorials.py` runs every check on them.
"""

from __future__ import annotations

import itertools
import math

import torch

from msm.kernel_maps import kernel_offsets, lookup


def _l2_per_voxel(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    "Mean squared error over channels, per voxel (V,): the default loss of `masked_level_loss`."
    return ((pred - target) ** 2).mean(1)


# Exercise 1 (01_kernel_map.ipynb)
def build_kernel_map(coords: torch.Tensor, kernel_size: int = 3):
    "Submanifold kernel map of coords (M, 4): per offset k, input rows in_idx[k] and output rows out_idx[k]."
    coords = coords.int()
    in_idx, out_idx = [], []
    for d in kernel_offsets(kernel_size).tolist():  # (K, 3) in msm's (torchsparse's) order
        shifted = coords.clone()
        shifted[:, 1:] += torch.tensor(d, dtype=torch.int32)  # the neighbour coords[o] + d of every output row o
        rows = lookup(shifted, coords)  # (M,) its input row, -1 where that voxel is empty
        o = (rows >= 0).nonzero().squeeze(1)
        in_idx.append(rows[o])
        out_idx.append(o)
    return in_idx, out_idx


# Exercise 2 (02_masking.ipynb)
def _cells(coords: torch.Tensor, size: int) -> torch.Tensor:
    "[b, floor(x / size), floor(y / size), floor(z / size)] of every row (M, 4), int64."
    coords = coords.long()
    return torch.cat([coords[:, :1], torch.div(coords[:, 1:], size, rounding_mode="floor")], 1)


def coarse_mask(coords: torch.Tensor, mask: torch.Tensor, level: int):
    "Voxels (M_l, 4) of level `level` and their mask (M_l,): masked iff every finest voxel inside is masked."
    cells, parent = torch.unique(_cells(coords, 2**level), dim=0, return_inverse=True)  # (M_l, 4), (M,)
    n_visible = torch.zeros(len(cells), dtype=torch.long).index_add_(0, parent, (~mask).long())  # (M_l,)
    return cells, n_visible == 0


def predict_level_ratios(coords: torch.Tensor, patch_size: int, ratio: float, n_levels: int) -> list:
    "Expected share of masked voxels at each level: the mean over level-l voxels of ratio ** (patches they touch)."
    patch = _cells(coords, patch_size)  # (M, 4) the patch of every finest voxel
    out = []
    for level in range(n_levels):
        pairs = torch.unique(torch.cat([_cells(coords, 2**level), patch], 1), dim=0)  # distinct (voxel, patch)
        _, n = torch.unique(pairs[:, :4], dim=0, return_counts=True)  # (M_l,) patches per level-l voxel
        out.append(float((ratio ** n.double()).mean()))
    return out


# Exercise 3 (03_loss.ipynb)
def masked_level_loss(pred, masked, teacher, pairs_student, pairs_teacher, weights, n_items: int,
                      per_voxel=_l2_per_voxel) -> torch.Tensor:
    "Per-scene loss (n_items,) of one level: masked student voxels against the scatter-mean of normalised targets."
    rows_s = lookup(pairs_student, pred.coords)  # (K,) student row of every pair
    rows_t = lookup(pairs_teacher, teacher.coords)  # (K,) teacher row of every pair
    keep = masked[rows_s]  # only pairs of masked student voxels
    rows_s, rows_t, w = rows_s[keep], rows_t[keep], weights[keep].float()
    t = torch.nn.functional.layer_norm(teacher.feats.float(), teacher.feats.shape[-1:], eps=1e-6)  # (M_t, C)
    voxels, inv = torch.unique(rows_s, return_inverse=True)  # (V,), (K',)
    num = t.new_zeros(len(voxels), t.shape[1]).index_add_(0, inv, t[rows_t] * w[:, None])  # (V, C)
    den = t.new_zeros(len(voxels)).index_add_(0, inv, w)  # (V,)
    loss = per_voxel(pred.feats[voxels].float(), num / den[:, None])  # (V,)
    scene = pred.coords[voxels, 0].long()  # (V,)
    sums = loss.new_zeros(n_items).index_add_(0, scene, loss)
    return sums / torch.bincount(scene, minlength=n_items).clamp_min(1)


def cosine_per_voxel(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    "1 - cosine similarity of every row (V,) of pred and target (V, C)."
    return 1 - torch.nn.functional.cosine_similarity(pred, target, dim=1, eps=1e-6)


# Exercise 4 (04_ema_teacher.ipynb)
def teacher_momentum(step: int, total: int, start: float = 0.996, end: float = 1.0) -> float:
    "EMA momentum at `step` of `total`: `start` -> `end` along a half cosine (`end` after the run or for total <= 0)."
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end - (end - start) * (1 + math.cos(math.pi * t)) / 2


@torch.no_grad()
def ema_update(teacher, student, momentum: float) -> None:
    "teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter, in place; buffers copied."
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


# Exercise 5 (05_probe_levels.ipynb)
def sample_level(feats: torch.Tensor, coords: torch.Tensor, stride: int, points: torch.Tensor) -> torch.Tensor:
    "Trilinear features (N, C) of one level (feats (M, C), coords (M, 4) of scene 0) at finest voxels points (N, 3)."
    u = (points.double() + 0.5) / stride - 0.5  # (N, 3) position in level voxels, voxel centres at integers
    base = u.floor()
    frac = u - base  # (N, 3) in [0, 1)
    out = feats.new_zeros(len(points), feats.shape[1])
    for corner in itertools.product((0, 1), repeat=3):
        off = torch.tensor(corner, dtype=torch.float64)
        q = torch.cat([torch.zeros(len(points), 1, dtype=torch.long), (base + off).long()], 1)  # (N, 4)
        rows = lookup(q.int(), coords)  # (N,) -1 where the corner voxel is empty
        w = torch.where(off.bool(), frac, 1 - frac).prod(1)  # (N,) trilinear weight of this corner
        w = torch.where(rows >= 0, w, 0.0).to(feats.dtype)  # empty corners count as zero
        out += w[:, None] * feats[rows.clamp_min(0)]
    return out
