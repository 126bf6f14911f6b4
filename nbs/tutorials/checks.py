"""Checks of the course exercises in `nbs/tutorials/`: each `check_*` runs a learner's function against msm itself
and raises `AssertionError` with a sentence saying what is wrong (or returns a small dict of what it measured).

Reference solutions live in `solutions.py` next to this file. `solution_or(fn)` swaps a learner's function for the
reference of the same name when solutions are switched on: under `nbdev-test` (it sets `IN_TEST`), or with the
environment variable `MSM_SOLUTIONS=1`; `MSM_SOLUTIONS=0` always keeps the learner's own code, e.g.
`MSM_SOLUTIONS=0 nbdev-test nbs/tutorials/01_kernel_map.ipynb` tests your answers from a shell.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from msm.data import load_scene
from msm.hunet import HUNet, HUNetConfig
from msm.kernel_maps import KernelMap, kernel_map, kernel_offsets, random_coords, sparse_conv
from msm.masking import MaskConfig, level_mask_ratios, level_masks, patch_mask, random_voxel_mask
from msm.objective import MaskedSceneModel, ObjectiveConfig, PairSampler, collate_pairs, ema_momentum, feature_loss
from msm.probe import sample_features
from msm.sparse import Conv3d, SparseTensor
from msm.transforms import default_pretrain_transform
from msm.voxelize import collate, voxelize_scene

DATA = Path(__file__).resolve().parents[2] / "data_samples"  # the repository's sample rooms


# -- switching between the learner's code and the reference ----------------------------------------------------------
def solutions_on() -> bool:
    "True when the exercise notebooks should run the reference solutions (tests) instead of the learner's code."
    flag = os.environ.get("MSM_SOLUTIONS")
    if flag is not None:
        return flag.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(os.environ.get("IN_TEST"))  # nbdev-test sets IN_TEST=1 while it runs a notebook


def solution_or(fn):
    "`fn` itself, or the reference of the same name from solutions.py when `solutions_on()`."
    if not solutions_on():
        return fn
    import solutions

    return getattr(solutions, fn.__name__)


def _call(fn, *args, **kwargs):
    "Call a learner's function, turning the stub's NotImplementedError into a hint."
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        raise NotImplementedError(f"{getattr(fn, '__name__', fn)} is still a stub ({e}): write it in the exercise "
                                  "cell, or set MSM_SOLUTIONS=1 to run the reference solution") from None


def _sample_rooms(names=("room_0000", "room_0001"), split="train") -> list:
    if not (DATA / split).is_dir():
        raise FileNotFoundError(f"{DATA}: the sample rooms are missing (the checks need the repository checkout)")
    return [load_scene(DATA / split / n) for n in names]


def room_coords(voxel_size: float = 0.04, names=("room_0000", "room_0001")) -> torch.Tensor:
    "Batch-first voxel coords (M, 4) int32 of sample rooms at `voxel_size` (the tiny preset's 4 cm by default)."
    return collate([voxelize_scene(r, voxel_size, "first") for r in _sample_rooms(names)])["coords"]


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    "True when the integer rows a (n, d) and b (m, d) are the same multiset of rows (any order)."
    if a.shape != b.shape:
        return False
    if len(a) == 0:
        return True
    a, b = a.long(), b.long()
    both = torch.cat([a, b])
    lo, span = both.min(0).values, both.max(0).values - both.min(0).values + 1  # one box for both sets
    keys = []
    for rows in (a, b):
        key = torch.zeros(len(rows), dtype=torch.long)
        for j in range(rows.shape[1]):
            key = key * span[j] + (rows[:, j] - lo[j])
        keys.append(key.sort().values)
    return torch.equal(*keys)


# -- exercise 1: kernel maps ------------------------------------------------------------------------------------------
def _check_map_format(res, K: int, M: int, where: str):
    if not (isinstance(res, (tuple, list)) and len(res) == 2):
        raise AssertionError(f"{where}: build_kernel_map must return (in_idx, out_idx), got {type(res).__name__}")
    in_idx, out_idx = res
    if len(in_idx) != K or len(out_idx) != K:
        raise AssertionError(f"{where}: expected {K} tensors per list (one per offset, kernel_offsets order), "
                             f"got {len(in_idx)} and {len(out_idx)}")
    for k, (i, o) in enumerate(zip(in_idx, out_idx)):
        if not (torch.is_tensor(i) and torch.is_tensor(o)) or i.shape != o.shape or i.ndim != 1:
            raise AssertionError(f"{where}: offset {k}: in_idx[k] and out_idx[k] must be 1-D tensors of one length")
        if len(i) and (i.is_floating_point() or int(i.min()) < 0 or int(i.max()) >= M or int(o.min()) < 0
                       or int(o.max()) >= M):
            raise AssertionError(f"{where}: offset {k}: rows must be integers in [0, {M})")
    return [i.long() for i in in_idx], [o.long() for o in out_idx]


def check_kernel_map(build_kernel_map) -> dict:
    """Exercise 1: `build_kernel_map(coords, kernel_size)` gives, offset by offset, the pairs of `msm.kernel_maps.kernel_map`,
    and a sparse convolution over that map equals `msm.sparse.Conv3d`."""
    cases = {"toy 2D (the picture of 03a_kernel_maps)": (toy_coords(), 3), "random, 2 scenes, kernel 3": (random_coords(300), 3),
             "random, 2 scenes, kernel 5": (random_coords(300, seed=1), 5), "two sample rooms at 4 cm": (room_coords(), 3)}
    offsets, n_pairs = None, 0
    for name, (coords, ks) in cases.items():
        K, M = ks**3, len(coords)
        in_idx, out_idx = _check_map_format(_call(build_kernel_map, coords, ks), K, M, name)
        ref = kernel_map(coords, ks)
        offsets = kernel_offsets(ks)
        for k in range(K):
            mine, theirs = torch.stack([in_idx[k], out_idx[k]], 1), torch.stack([ref.in_idx[k], ref.out_idx[k]], 1)
            if not _same_rows(mine, theirs):
                d = offsets[k].tolist()
                raise AssertionError(
                    f"{name}: offset k={k} (dx, dy, dz)={tuple(d)} has {len(mine)} pairs, msm has {len(theirs)}"
                    f"{'' if len(mine) != len(theirs) else ' (different ones)'}: a pair (i, o) means "
                    f"coords[i] = coords[o] + {tuple(d)} in the same scene (column 0)")
        n_pairs += sum(len(i) for i in in_idx)
        # the convolution over the learner's map equals msm's Conv3d
        torch.manual_seed(0)
        conv = Conv3d(4, 5, ks)
        feats = torch.randn(M, 4)
        km = KernelMap(in_idx, out_idx, kernel_offsets(ks), M, M, coords, coords)
        with torch.no_grad():
            mine, theirs = sparse_conv(feats, conv.kernel, km), conv(SparseTensor(feats, coords)).feats
        if not torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4):
            raise AssertionError(f"{name}: a convolution over your map differs from msm.sparse.Conv3d by "
                                 f"{float((mine - theirs).abs().max()):.3g}")
    return {"cases": len(cases), "pairs": n_pairs}


def toy_coords() -> torch.Tensor:
    "The 8 voxels of the 2D picture in 03a_kernel_maps (z = 0, one scene)."
    pts = torch.tensor([[0, 0], [1, 0], [2, 0], [2, 1], [3, 1], [1, 2], [2, 2], [0, 3]])
    z = torch.zeros(len(pts), 1, dtype=torch.long)
    return torch.cat([z, pts, z], 1).int()


# -- exercise 2: masks across levels ----------------------------------------------------------------------------------
def check_coarse_mask(coarse_mask) -> dict:
    """Exercise 2a: `coarse_mask(coords, mask, level)` gives the voxels of `level` and their mask as
    `msm.masking.level_masks` does (any row order)."""
    coords = random_coords(600, lo=-9, hi=9)
    cases = {"patch mask (2-voxel patches)": patch_mask(coords, 2, 0.5, torch.Generator().manual_seed(0)),
             "patch mask (4-voxel patches)": patch_mask(coords, 4, 0.4, torch.Generator().manual_seed(1)),
             "single voxels, ratio 0.9": random_voxel_mask(coords, 0.9, torch.Generator().manual_seed(2))}
    n_levels = 5
    for name, mask in cases.items():
        ref = level_masks(coords, mask, n_levels)
        for level in range(n_levels):
            res = _call(coarse_mask, coords, mask.clone(), level)
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                raise AssertionError(f"coarse_mask must return (coords_l, mask_l), got {type(res).__name__}")
            c_l, m_l = torch.as_tensor(res[0]), torch.as_tensor(res[1])
            rc, rm = ref[level]
            if c_l.shape != rc.shape:
                raise AssertionError(f"{name}, level {level}: {tuple(c_l.shape)} voxels, expected {tuple(rc.shape)} "
                                     "(the distinct [b, floor(x / 2**l), floor(y / 2**l), floor(z / 2**l)]; floor, "
                                     "also for negative coordinates, and never merge two scenes)")
            if m_l.shape != (len(c_l),) or m_l.dtype != torch.bool:
                raise AssertionError(f"{name}, level {level}: the mask must be bool of shape ({len(c_l)},)")
            if not _same_rows(torch.cat([c_l.long(), m_l.long()[:, None]], 1), torch.cat([rc.long(), rm.long()[:, None]], 1)):
                raise AssertionError(f"{name}, level {level}: {int(m_l.sum())} masked voxels, msm has {int(rm.sum())}"
                                     " (or other voxels): a coarse voxel is masked iff ALL its finest voxels are")
    return {"cases": len(cases), "levels": n_levels}


COMBOS = ((8, 0.4), (2, 0.4), (1, 0.6), (4, 0.8))  # (patch_size, ratio) the prediction is checked on


def measured_level_ratios(coords, patch_size: int, ratio: float, n_levels: int, draws: int = 16, seed: int = 0):
    "Masked share per level, averaged over `draws` patch masks (msm.masking.patch_mask + level_mask_ratios)."
    g = torch.Generator().manual_seed(seed)
    r = [level_mask_ratios(coords, patch_mask(coords, patch_size, ratio, g), n_levels) for _ in range(draws)]
    return np.mean(r, 0).tolist()


def check_predicted_ratios(predict_level_ratios, tol: float = 0.02) -> dict:
    """Exercise 2b: `predict_level_ratios(coords, patch_size, ratio, n_levels)` predicts the masked share of every level
    within `tol` of what 16 random patch masks give, on two sample rooms at 4 cm (4 levels, the tiny preset)."""
    coords, n_levels, worst = room_coords(), 4, {}
    for p, r in COMBOS:
        pred = _call(predict_level_ratios, coords, p, r, n_levels)
        if len(pred) != n_levels:
            raise AssertionError(f"predict_level_ratios must return {n_levels} numbers (one per level), got {len(pred)}")
        meas = measured_level_ratios(coords, p, r, n_levels)
        err = [abs(float(a) - b) for a, b in zip(pred, meas)]
        worst[(p, r)] = max(err)
        if max(err) > tol:
            lv = int(np.argmax(err))
            raise AssertionError(f"patch_size={p}, ratio={r}: level {lv} predicted {float(pred[lv]):.3f}, measured "
                                 f"{meas[lv]:.3f} (all levels: measured {[round(m, 3) for m in meas]})")
    return {"worst error": max(worst.values())}


# -- exercise 3: the masked feature loss of one level -----------------------------------------------------------------
def l2_per_voxel(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    "Mean squared error over channels, per voxel (V,) (msm's `feature_loss(kind='l2')`)."
    return ((pred - target) ** 2).mean(1)


def loss_case(loss: str = "l2", seed: int = 0, crops=(3000, 1500), target_norm: str = "layer") -> dict:
    """A MaskedSceneModel (tiny) on a batch of crops of two sample rooms (of unequal sizes, so that a per-scene mean
    differs from a mean over the batch), its loss dict, and every level's raw material: `pred` (the student level
    after its head), `masked`, `teacher`, the pairs and weights."""
    torch.manual_seed(seed)
    model = MaskedSceneModel(HUNetConfig.tiny(), ObjectiveConfig(loss=loss, target_norm=target_norm)).eval()
    items = []
    for i, (room, crop) in enumerate(zip(_sample_rooms(), crops)):
        sampler = PairSampler(default_pretrain_transform(crop_points=crop), 0.04, model.n_levels,
                              MaskConfig.for_levels(model.n_levels), shared_crop=crop)
        items.append(sampler(room, np.random.default_rng(seed + i)))
    batch = collate_pairs(items)
    seen = {}
    hooks = [model.student.register_forward_hook(lambda m, a, out: seen.__setitem__("student", out)),
             model.teacher.register_forward_hook(lambda m, a, out: seen.__setitem__("teacher", out))]
    try:
        with torch.no_grad():
            res = model(batch)
            preds = [lv.replace_feats(head(lv.feats)) for lv, head in zip(seen["student"].levels, model.heads)]
    finally:
        for h in hooks:
            h.remove()
    return {"res": res, "n_items": batch["n_items"], "levels": [
        {"pred": preds[lv], "masked": seen["student"].masked[lv], "teacher": seen["teacher"][lv],
         "pairs_student": batch["pairs_student"][lv], "pairs_teacher": batch["pairs_teacher"][lv],
         "weights": batch["pair_weights"][lv]} for lv in range(model.n_levels)]}


def _compare_loss(masked_level_loss, case: dict, per_voxel, what: str) -> list:
    out = []
    for lv, args in enumerate(case["levels"]):
        got = _call(masked_level_loss, args["pred"], args["masked"], args["teacher"], args["pairs_student"],
                    args["pairs_teacher"], args["weights"], case["n_items"], per_voxel=per_voxel)
        got = torch.as_tensor(got)
        if got.shape != (case["n_items"],):
            raise AssertionError(f"{what}, level {lv}: return one loss per scene, shape ({case['n_items']},), "
                                 f"got {tuple(got.shape)}")
        want = float(case["res"][f"loss_l{lv}"])
        mine = float(got.sum()) / case["n_items"]
        if not abs(mine - want) <= 1e-4 * max(1.0, abs(want)):
            raise AssertionError(f"{what}, level {lv}: mean over scenes {mine:.6f}, MaskedSceneModel's loss_l{lv} is "
                                 f"{want:.6f}")
        out.append(mine)
    return out


def check_masked_level_loss(masked_level_loss) -> dict:
    """Exercise 3a: `masked_level_loss(pred, masked, teacher, pairs_student, pairs_teacher, weights, n_items,
    per_voxel)` reproduces `MaskedSceneModel`'s loss of every level (L2, layer-normalised targets)."""
    return {"l2": _compare_loss(masked_level_loss, loss_case("l2"), l2_per_voxel, "L2 loss")}


def check_cosine_per_voxel(cosine_per_voxel, masked_level_loss=None) -> dict:
    """Exercise 3b: `cosine_per_voxel(pred, target)` equals `feature_loss(kind='cosine')` and, through
    `masked_level_loss`, gives the loss of a `MaskedSceneModel` built with `ObjectiveConfig(loss='cosine')`."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(50, 24, generator=g), torch.randn(50, 24, generator=g)
    target[:5] = 3 * pred[:5]  # same direction: zero loss
    got = torch.as_tensor(_call(cosine_per_voxel, pred, target))
    want = feature_loss(pred, target, "cosine")
    if got.shape != want.shape or not torch.allclose(got.float(), want, atol=1e-5):
        raise AssertionError(f"cosine_per_voxel: expected 1 - cos(pred, target) per row, shape {tuple(want.shape)}; "
                             f"first rows {got.flatten()[:3].tolist()} vs {want[:3].tolist()}")
    res = {"random rows": len(pred)}
    if masked_level_loss is not None:
        res["cosine"] = _compare_loss(masked_level_loss, loss_case("cosine"), cosine_per_voxel, "cosine loss")
    return res


# -- exercise 4: the EMA teacher -------------------------------------------------------------------------------------
MOMENTUM_CASES = [(s, 1000, 0.996, 1.0) for s in (0, 1, 100, 250, 500, 750, 999, 1000, 1500)] + [
    (30, 100, 0.99, 0.999), (0, 0, 0.996, 1.0)]  # (step, total, start, end); past the end and an empty run included


def check_teacher_momentum(teacher_momentum) -> dict:
    """Exercise 4a: `teacher_momentum(step, total, start, end)` is msm's schedule (`msm.objective.ema_momentum`):
    `start` at step 0, `end` at step `total` and after, a half cosine in between; `end` when `total <= 0`."""
    for step, total, start, end in MOMENTUM_CASES:
        got, want = float(_call(teacher_momentum, step, total, start, end)), ema_momentum(step, total, start, end)
        if not abs(got - want) <= 1e-12:  # float64 arithmetic on values near 1: a few ulps, far below any wrong schedule
            raise AssertionError(f"teacher_momentum({step}, {total}, {start}, {end}) = {got:.6f}, expected {want:.6f} "
                                 f"(a half cosine from start at step 0 to end at step total, end after it)")
    return {"momentum at 0 / 25 / 50 / 75 / 100 %": [round(ema_momentum(s, 1000), 6) for s in (0, 250, 500, 750, 1000)]}


def ema_pair(seed: int = 0) -> MaskedSceneModel:
    "A `MaskedSceneModel` (tiny) whose student has moved away from its teacher (as after some optimiser steps)."
    torch.manual_seed(seed)
    model = MaskedSceneModel(HUNetConfig.tiny(), ObjectiveConfig())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _params(module) -> list:
    return [p.detach().clone() for p in module.parameters()]


def check_ema_update(ema_update) -> dict:
    """Exercise 4b: `ema_update(teacher, student, momentum)` moves every teacher parameter in place to
    momentum * teacher + (1 - momentum) * student, as `MaskedSceneModel.update_teacher`, leaving the student as it
    was and the teacher without gradients."""
    res = {}
    for m in (0.9, 0.996, 1.0, 0.0):
        mine, ref = ema_pair(), ema_pair()
        student_before, teacher_ids = _params(mine.student), [id(p) for p in mine.teacher.parameters()]
        _call(ema_update, mine.teacher, mine.student, m)
        ref.update_teacher(m)
        if [id(p) for p in mine.teacher.parameters()] != teacher_ids:
            raise AssertionError("ema_update: update the teacher's parameters in place (the model keeps them), "
                                 "do not replace them")
        for a, b in zip(mine.student.parameters(), student_before):
            if not torch.equal(a.detach(), b):
                raise AssertionError(f"ema_update (momentum {m}): the student changed; only the teacher moves")
        for (name, a), b in zip(mine.teacher.named_parameters(), ref.teacher.parameters()):
            if a.requires_grad:
                raise AssertionError(f"ema_update (momentum {m}): teacher parameter {name} now requires grad; run the "
                                     "update under torch.no_grad() (the teacher is never trained by backprop)")
            # float32: a * m + b * (1 - m) in any order agrees to a few ulps of the values (|values| < 10 here)
            if not torch.allclose(a.detach(), b.detach(), rtol=1e-5, atol=1e-6):
                err = float((a.detach() - b.detach()).abs().max())
                raise AssertionError(f"ema_update (momentum {m}): teacher parameter {name} differs from "
                                     f"momentum * teacher + (1 - momentum) * student by up to {err:.3g}")
        pairs = zip(mine.teacher.parameters(), mine.student.parameters())
        dist = sum(float((t - s).detach().pow(2).sum()) for t, s in pairs)
        res[m] = round(dist ** 0.5, 4)
    return {"teacher-student distance after one step, by momentum": res}


# -- exercise 5: reading one level back at the points -----------------------------------------------------------------
def tiny_levels(name: str = "room_0008", seed: int = 0):
    "Decoder levels of a random tiny HUNet on a sample room, and the finest grid coordinate of every point (N, 3)."
    vox = voxelize_scene(_sample_rooms((name,), "val")[0], 0.04, "first")
    torch.manual_seed(seed)
    net = HUNet(HUNetConfig.tiny()).eval()
    net.config.shuffle_curves = False
    x = SparseTensor(vox["feat"], torch.cat([torch.zeros_like(vox["grid_coord"][:, :1]), vox["grid_coord"]], 1))
    with torch.no_grad():
        levels = net(x)
    return levels, vox["grid_coord"][vox["inverse"]].long()


def check_sample_level(sample_level) -> dict:
    """Exercise 5: `sample_level(feats, coords, stride, points)` equals `msm.probe.sample_features(levels, points,
    level_ids=[l])` (trilinear, voxel centres, empty corners count as zero) on every level of a tiny HUNet."""
    # the hand-made case of 09a_features: stride 2, voxels (0, 0, 0) and (1, 0, 0), one point in finest voxel (1, 0, 0)
    c = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = _call(sample_level, f, c, 2, torch.tensor([[1, 0, 0]]))
    want = torch.tensor([[0.75**3, 0.25 * 0.75**2]])
    if tuple(got.shape) != (1, 2) or not torch.allclose(got.float(), want, atol=1e-6):
        raise AssertionError(f"hand-made case (09a_features): got {got.tolist()}, expected {want.tolist()}: the point sits at "
                             "u = (c + 0.5) / stride - 0.5 = (0.25, -0.25, -0.25) level voxels; only the corners with "
                             "y = z = 0 exist")
    levels, pts = tiny_levels()
    for lv, level in enumerate(levels):
        got = _call(sample_level, level.feats, level.coords, level.stride, pts)
        want = sample_features(levels, pts, level_ids=[lv])
        if tuple(got.shape) != tuple(want.shape):
            raise AssertionError(f"level {lv}: shape {tuple(got.shape)}, expected {tuple(want.shape)} (points, channels)")
        err = float((got.float() - want).abs().max())
        if err > 1e-4:
            raise AssertionError(f"level {lv} (stride {level.stride}): differs from sample_features by up to {err:.3g}"
                                 + (" (at level 0 every point must get exactly its own voxel's feature)" if lv == 0 else ""))
    return {"levels": len(levels), "points": len(pts)}
