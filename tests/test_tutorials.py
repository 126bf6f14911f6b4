"""The course exercises (nbs/tutorials): every reference solution passes its check, wrong answers fail it, the switch
between a learner's code and the reference works, and the exercise notebooks export nothing and ship no answers."""
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TUTORIALS = Path(__file__).resolve().parents[1] / "nbs" / "tutorials"
sys.path.insert(0, str(TUTORIALS))
import checks  # noqa: E402
import solutions as S  # noqa: E402

from msm.probe import sample_features  # noqa: E402
from msm.sparse import SparseTensor, kernel_map, kernel_offsets, lookup  # noqa: E402

EXERCISES = {  # notebook -> the functions its learner writes
    "01_kernel_map.ipynb": ["build_kernel_map"],
    "02_masking.ipynb": ["coarse_mask", "predict_level_ratios"],
    "03_loss.ipynb": ["masked_level_loss", "cosine_per_voxel"],
    "04_ema_teacher.ipynb": ["teacher_momentum", "ema_update"],
    "05_probe_levels.ipynb": ["sample_level"],
}


# -- the references pass ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check, solution", [
    (checks.check_kernel_map, S.build_kernel_map),
    (checks.check_coarse_mask, S.coarse_mask),
    (checks.check_predicted_ratios, S.predict_level_ratios),
    (checks.check_sample_level, S.sample_level),
    (checks.check_masked_level_loss, S.masked_level_loss),
    (checks.check_teacher_momentum, S.teacher_momentum),
    (checks.check_ema_update, S.ema_update),
], ids=lambda x: getattr(x, "__name__", ""))
def test_reference_passes(check, solution):
    assert isinstance(check(solution), dict)


def test_cosine_reference_passes_through_the_loss():
    res = checks.check_cosine_per_voxel(S.cosine_per_voxel, S.masked_level_loss)
    assert len(res["cosine"]) == 4


# -- wrong answers fail ----------------------------------------------------------------------------------------------
def _swapped(coords, ks=3):
    km = kernel_map(coords, ks)
    return km.out_idx, km.in_idx


def _z_fastest(coords, ks=3):
    "The pairs of every offset, listed in itertools.product order (z fastest) instead of msm's (x fastest)."
    in_idx, out_idx = S.build_kernel_map(coords, ks)
    where = {tuple(d): k for k, d in enumerate(kernel_offsets(ks).tolist())}
    r = range(-(ks // 2), ks // 2 + 1)
    order = [where[d] for d in itertools.product(r, r, r)]
    return [in_idx[k] for k in order], [out_idx[k] for k in order]


def _no_scene(coords, ks=3):
    "Neighbours searched without the scene column: voxels of different scenes meet."
    flat = coords.clone()
    flat[:, 0] = 0
    return S.build_kernel_map(flat, ks)


def _no_centre(coords, ks=3):
    in_idx, out_idx = S.build_kernel_map(coords, ks)
    c = len(in_idx) // 2
    in_idx[c], out_idx[c] = in_idx[c][:0], out_idx[c][:0]
    return in_idx, out_idx


@pytest.mark.parametrize("wrong", [_swapped, _z_fastest, _no_scene, _no_centre], ids=lambda f: f.__name__)
def test_wrong_kernel_maps_fail(wrong):
    with pytest.raises(AssertionError, match="offset k=|differs from msm.sparse.Conv3d"):
        checks.check_kernel_map(wrong)


def _any_child(coords, mask, level):
    c, all_visible = S.coarse_mask(coords, ~mask, level)
    return c, ~all_visible


def _truncating(coords, mask, level):
    "Coarse cells by truncation toward zero: wrong for negative coordinates."
    c = coords.long()
    cells = torch.cat([c[:, :1], torch.div(c[:, 1:], 2**level, rounding_mode="trunc")], 1)
    u, parent = torch.unique(cells, dim=0, return_inverse=True)
    vis = torch.zeros(len(u), dtype=torch.long).index_add_(0, parent, (~mask).long())
    return u, vis == 0


def _merged_scenes(coords, mask, level):
    flat = coords.clone()
    flat[:, 0] = 0
    return S.coarse_mask(flat, mask, level)


@pytest.mark.parametrize("wrong", [_any_child, _truncating, _merged_scenes], ids=lambda f: f.__name__)
def test_wrong_coarse_masks_fail(wrong):
    with pytest.raises(AssertionError, match="level"):
        checks.check_coarse_mask(wrong)


def _constant(coords, p, r, n):
    return [r] * n


def _surface_formula(coords, p, r, n):
    "A level-l voxel on a flat surface touches (2**l / p)**2 patches: a formula that ignores the real geometry."
    return [r ** max(1.0, (2**lv / p) ** 2) for lv in range(n)]


def _per_voxel_model(coords, p, r, n):
    "Masked iff all finest voxels are, as if each were its own patch (ignores the patch size)."
    return S.predict_level_ratios(coords, 1, r, n)


@pytest.mark.parametrize("wrong", [_constant, _surface_formula, _per_voxel_model], ids=lambda f: f.__name__)
def test_wrong_predictions_fail(wrong):
    with pytest.raises(AssertionError, match="predicted"):
        checks.check_predicted_ratios(wrong)


def _library(**kw):
    def sample(feats, coords, stride, points):
        return sample_features([SparseTensor(feats, coords, stride, check=False)], points, **kw)
    return sample


def _shifted(feats, coords, stride, points):
    "u = (c + 0.5) / stride, forgetting that level voxel centres sit at integers (the - 0.5)."
    u = (points.double() + 0.5) / stride
    base, out = u.floor(), feats.new_zeros(len(points), feats.shape[1])
    for corner in itertools.product((0, 1), repeat=3):
        off = torch.tensor(corner, dtype=torch.float64)
        rows = lookup(torch.cat([torch.zeros(len(points), 1, dtype=torch.long), (base + off).long()], 1).int(), coords)
        w = torch.where(off.bool(), u - base, 1 - (u - base)).prod(1)
        out += torch.where(rows >= 0, w, 0.0).to(feats.dtype)[:, None] * feats[rows.clamp_min(0)]
    return out


@pytest.mark.parametrize("wrong", [_library(method="nearest"), _library(align="official"), _library(empty="renormalize"),
                                   _shifted], ids=["nearest", "official_align", "renormalize", "no_centre_shift"])
def test_wrong_samplers_fail(wrong):
    with pytest.raises(AssertionError, match="hand-made case|level"):
        checks.check_sample_level(wrong)


def _loss_variant(normalise=True, use_mask=True, use_weights=True, per_scene=True):
    "The reference loss with one deliberate mistake switched on."
    def loss(pred, masked, teacher, pairs_student, pairs_teacher, weights, n_items, per_voxel=checks.l2_per_voxel):
        rows_s, rows_t = lookup(pairs_student, pred.coords), lookup(pairs_teacher, teacher.coords)
        keep = masked[rows_s] if use_mask else torch.ones_like(rows_s, dtype=torch.bool)
        rows_s, rows_t = rows_s[keep], rows_t[keep]
        w = weights[keep].float() if use_weights else torch.ones(int(keep.sum()))
        t = teacher.feats.float()
        t = F.layer_norm(t, t.shape[-1:], eps=1e-6) if normalise else t
        voxels, inv = torch.unique(rows_s, return_inverse=True)
        num = t.new_zeros(len(voxels), t.shape[1]).index_add_(0, inv, t[rows_t] * w[:, None])
        den = t.new_zeros(len(voxels)).index_add_(0, inv, w)
        per = per_voxel(pred.feats[voxels].float(), num / den[:, None])
        if not per_scene:  # one mean over all voxels of the batch, repeated for every scene
            return per.mean().repeat(n_items)
        scene = pred.coords[voxels, 0].long()
        return per.new_zeros(n_items).index_add_(0, scene, per) / torch.bincount(scene, minlength=n_items).clamp_min(1)
    return loss


def test_loss_variant_without_mistakes_passes():
    checks.check_masked_level_loss(_loss_variant())


@pytest.mark.parametrize("mistake", ["normalise", "use_mask", "use_weights", "per_scene"])
def test_wrong_losses_fail(mistake):
    with pytest.raises(AssertionError, match="loss_l"):
        checks.check_masked_level_loss(_loss_variant(**{mistake: False}))


@pytest.mark.parametrize("wrong", [
    lambda p, t: F.cosine_similarity(p, t, dim=1),
    lambda p, t: ((F.normalize(p, dim=1) - F.normalize(t, dim=1)) ** 2).sum(1),  # 2 - 2 cos
    lambda p, t: 1 - (p * t).sum(1),  # no normalisation
], ids=["similarity", "two_minus_two_cos", "dot_product"])
def test_wrong_cosine_fails(wrong):
    with pytest.raises(AssertionError, match="1 - cos"):
        checks.check_cosine_per_voxel(wrong)


def _linear_momentum(step, total, start=0.996, end=1.0):
    return end if total <= 0 else start + (end - start) * min(max(step / total, 0.0), 1.0)


def _reversed_momentum(step, total, start=0.996, end=1.0):
    "The half cosine run backwards: end at step 0, start at the end of the run."
    return S.teacher_momentum(step, total, end, start)


def _unclamped_momentum(step, total, start=0.996, end=1.0):
    "No clamp after the run: the cosine comes back down past step total."
    return end - (end - start) * (1 + math.cos(math.pi * step / max(total, 1))) / 2


@pytest.mark.parametrize("wrong", [_linear_momentum, _reversed_momentum, _unclamped_momentum], ids=lambda f: f.__name__)
def test_wrong_momentum_fails(wrong):
    with pytest.raises(AssertionError, match="half cosine"):
        checks.check_teacher_momentum(wrong)


@torch.no_grad()
def _swapped_ema(teacher, student, momentum):
    "momentum on the student: the teacher jumps to the student instead of averaging."
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(1 - momentum).add_(s, alpha=momentum)


@torch.no_grad()
def _student_moves(teacher, student, momentum):
    S.ema_update(student, teacher, momentum)


def _with_grad(teacher, student, momentum):
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s, alpha=1 - momentum)


def _replaced(teacher, student, momentum):
    for (name, t), s in zip(list(teacher.named_parameters()), student.parameters()):
        module, _, attr = name.rpartition(".")
        owner = teacher.get_submodule(module) if module else teacher
        setattr(owner, attr, torch.nn.Parameter(momentum * t.detach() + (1 - momentum) * s.detach(), requires_grad=False))


@pytest.mark.parametrize("wrong, message", [(_swapped_ema, "differs from momentum"), (_student_moves, "student changed"),
                                            (_with_grad, "requires grad"), (_replaced, "in place")],
                         ids=["swapped", "student_moves", "with_grad", "replaced"])
def test_wrong_ema_updates_fail(wrong, message):
    with pytest.raises(AssertionError, match=message):
        checks.check_ema_update(wrong)


# -- the switch between the learner's code and the reference ---------------------------------------------------------
def build_kernel_map(coords, kernel_size=3):
    raise NotImplementedError("not written yet")


@pytest.mark.parametrize("env, on", [({}, False), ({"IN_TEST": "1"}, True), ({"IN_TEST": "1", "MSM_SOLUTIONS": "0"}, False),
                                     ({"MSM_SOLUTIONS": "1"}, True), ({"MSM_SOLUTIONS": "no"}, False)])
def test_solution_switch(monkeypatch, env, on):
    for k in ("IN_TEST", "MSM_SOLUTIONS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert checks.solutions_on() is on
    assert (checks.solution_or(build_kernel_map) is S.build_kernel_map) is on


def test_stub_gives_a_hint():
    with pytest.raises(NotImplementedError, match="build_kernel_map is still a stub .*MSM_SOLUTIONS=1"):
        checks.check_kernel_map(build_kernel_map)


# -- the notebooks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["00_course.ipynb", *EXERCISES])
def test_notebooks_export_nothing(name):
    cells = json.loads((TUTORIALS / name).read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert not any(line.strip().startswith(("#| export", "#|export", "#| default_exp", "#| exporti"))
                   for src in code for line in src.splitlines()), f"{name}: tutorials must not export to msm"


@pytest.mark.parametrize("name, functions", EXERCISES.items())
def test_exercise_cells_are_stubs(name, functions):
    "The committed notebooks hold the stubs (the answers live in solutions.py only) and swap them for the reference."
    code = "\n".join("".join(c["source"]) for c in json.loads((TUTORIALS / name).read_text())["cells"]
                     if c["cell_type"] == "code")
    for fn in functions:
        start = code.index(f"def {fn}(")
        body = code[start:code.index("\n\n", start) if "\n\n" in code[start:] else len(code)]
        assert "raise NotImplementedError" in body, f"{name}: the exercise cell of {fn} is not a stub"
        assert f"{fn} = solution_or({fn})" in code, f"{name}: {fn} is never swapped for the reference under tests"
        assert callable(getattr(S, fn)), f"solutions.py has no {fn}"
