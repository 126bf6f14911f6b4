"Patch masks across levels (msm.masking): ratios, consistency between levels, batches, determinism, bad input."
import math

import numpy as np
import pytest
import torch

from msm.core import MSMError
from msm.data import synthetic_room
from msm.masking import MaskConfig, level_mask_ratios, level_masks, patch_mask, random_voxel_mask
from msm.sparse import downsample
from msm.voxelize import collate, voxelize_scene


@pytest.fixture(scope="module")
def batch_coords():
    gen = torch.Generator().manual_seed(0)
    rooms = [synthetic_room(s, n_points=15_000) for s in (3, 4, 5)]
    return collate([voxelize_scene(r, 0.02, "train", gen) for r in rooms])["coords"]  # (M, 4)


def _patches(coords, p):
    return torch.cat([coords[:, :1].long(), torch.div(coords[:, 1:].long(), p, rounding_mode="floor")], 1)


def _n_hidden(k_total, ratio):
    return min(math.floor(ratio * k_total + 0.5), k_total - 1)


@pytest.mark.parametrize("p", [4, 8, 16])
def test_exact_patch_count_per_scene_and_voxel_fraction(batch_coords, p):
    mask = patch_mask(batch_coords, p, 0.4, torch.Generator().manual_seed(7))
    pt = _patches(batch_coords, p)
    for b in range(3):
        sel = batch_coords[:, 0] == b
        all_p = torch.unique(pt[sel], dim=0)
        hid_p = torch.unique(pt[sel & mask], dim=0)
        assert len(hid_p) == _n_hidden(len(all_p), 0.4)  # ratio counts patches, exactly, per scene
        frac = mask[sel].float().mean().item()  # realised voxel share scatters around the patch ratio
        assert abs(frac - 0.4) < 0.1, (b, p, frac)


def test_nothing_visible_inside_a_masked_patch(batch_coords):
    mask = patch_mask(batch_coords, 8, 0.5, torch.Generator().manual_seed(1))
    pt = _patches(batch_coords, 8)
    _, inv = torch.unique(pt, dim=0, return_inverse=True)
    n_vis = torch.bincount(inv, weights=(~mask).double())
    n_all = torch.bincount(inv).double()
    assert torch.all((n_vis == 0) | (n_vis == n_all))  # each patch is wholly hidden or wholly visible


def test_uniform_over_patches():
    coords = torch.tensor([[0, 4 * i, 0, 0] for i in range(8)] + [[1, 0, 4 * i, 0] for i in range(5)], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    freq = torch.stack([patch_mask(coords, 4, 0.4, g) for _ in range(3000)]).double().mean(0)
    assert torch.allclose(freq[:8], torch.full((8,), 3 / 8, dtype=torch.float64), atol=0.035)  # round(3.2) = 3 of 8
    assert torch.allclose(freq[8:], torch.full((5,), 2 / 5, dtype=torch.float64), atol=0.035)  # 2 of 5


def test_each_scene_its_own_ratio_and_sparse_batch_ids():
    # scene ids need not be contiguous; tiny scenes keep one visible patch
    rng = np.random.default_rng(0)
    parts = [np.c_[np.full(n, b), rng.integers(0, 64, (n, 3))] for b, n in [(0, 500), (3, 2000), (7, 1)]]
    coords = torch.from_numpy(np.unique(np.concatenate(parts), axis=0)).int()
    mask = patch_mask(coords, 8, 0.4, torch.Generator().manual_seed(0))
    pt = _patches(coords, 8)
    for b in (0, 3):
        sel = coords[:, 0] == b
        assert len(torch.unique(pt[sel & mask], dim=0)) == _n_hidden(len(torch.unique(pt[sel], dim=0)), 0.4)
    assert not mask[coords[:, 0] == 7].any()  # a one-patch scene keeps its patch


def test_determinism_ratio0_and_bad_input(batch_coords):
    a = patch_mask(batch_coords, 16, 0.4, torch.Generator().manual_seed(3))
    b = patch_mask(batch_coords, 16, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, patch_mask(batch_coords, 16, 0.4, torch.Generator().manual_seed(4)))
    assert not patch_mask(batch_coords, 16, 0.0).any()
    assert patch_mask(batch_coords[:0], 16, 0.4).shape == (0,)
    for bad, msg in [(dict(ratio=1.0), "ratio must lie in [0, 1)"), (dict(ratio=-0.1), "ratio must lie"),
                     (dict(ratio=float("nan")), "ratio must lie"), (dict(patch_size=6), "power of two"),
                     (dict(patch_size=0), "power of two")]:
        kw = dict(patch_size=16, ratio=0.4) | bad
        with pytest.raises(MSMError, match=msg.replace("[", r"\[").replace(")", r"\)")):
            patch_mask(batch_coords, **kw)
    with pytest.raises(MSMError, match="integer voxel coordinates"):
        patch_mask(batch_coords.float(), 16, 0.4)
    with pytest.raises(MSMError, match=r"\(M, 4\)"):
        patch_mask(batch_coords[:, :3], 16, 0.4)


def test_high_ratio_keeps_one_visible_patch_per_scene(batch_coords):
    mask = patch_mask(batch_coords, 16, 0.9999, torch.Generator().manual_seed(0))
    pt = _patches(batch_coords, 16)
    for b in range(3):
        sel = batch_coords[:, 0] == b
        assert len(torch.unique(pt[sel & ~mask], dim=0)) == 1  # exactly one patch left for the student


@pytest.mark.parametrize("p", [2, 8, 16])
def test_levels_consistent(batch_coords, p):
    n_levels = 5
    mask = patch_mask(batch_coords, p, 0.4, torch.Generator().manual_seed(5))
    levels = level_masks(batch_coords, mask, n_levels)
    assert len(levels) == n_levels and torch.equal(levels[0][1], mask)
    visible = batch_coords[~mask]
    for lv in range(1, n_levels):
        c_l, m_l = levels[lv]
        # a level-l voxel is masked iff all its children at level l-1 are masked
        c_prev, m_prev = levels[lv - 1]
        parent = torch.cat([c_prev[:, :1], torch.div(c_prev[:, 1:], 2, rounding_mode="floor")], 1)
        _, inv = torch.unique(parent.long(), dim=0, return_inverse=True)
        all_masked = torch.ones(len(c_l), dtype=torch.int32).scatter_reduce(0, inv, m_prev.int(), "amin")
        assert torch.equal(m_l, all_masked.bool())
        # the visible set of level l == coarse voxels of the visible fine voxels (what the encoder sees)
        visible = downsample(visible)[0]
        assert torch.equal(c_l[~m_l], visible)
        assert torch.equal(c_l, downsample(c_prev)[0])  # same voxel order as the network's down-sampling
        if 2**lv <= p:  # exact below the patch size: masked share equals the voxel share of level 0 up to spread
            assert abs(m_l.float().mean().item() - 0.4) < 0.1


def test_level_masks_bad_input(batch_coords):
    mask = torch.zeros(len(batch_coords), dtype=torch.bool)
    with pytest.raises(MSMError, match="mask must be bool"):
        level_masks(batch_coords, mask[:-1], 3)
    with pytest.raises(MSMError, match="mask must be bool"):
        level_masks(batch_coords, mask.int(), 3)
    with pytest.raises(MSMError, match="n_levels"):
        level_masks(batch_coords, mask, 0)


def test_negative_coordinates_floor():
    coords = torch.tensor([[0, -1, 0, 0], [0, 0, 0, 0], [0, -4, 0, 0], [0, 3, 0, 0]], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = patch_mask(coords, 4, 0.5, g)  # patches {-1, 0}: one hidden
        assert m[0] == m[2] and m[1] == m[3] and m[0] != m[1]


def test_random_voxel_mask(batch_coords):
    m = random_voxel_mask(batch_coords, 0.4, torch.Generator().manual_seed(0))
    for b in range(3):
        n_b = int((batch_coords[:, 0] == b).sum())
        assert int(m[batch_coords[:, 0] == b].sum()) == math.floor(0.4 * n_b + 0.5)
    # per-voxel masks barely mask coarse levels; patches of the coarsest stride keep the ratio there
    assert level_mask_ratios(batch_coords, m, 5)[4] < 0.1
    assert abs(level_mask_ratios(batch_coords, patch_mask(batch_coords, 16, 0.4, torch.Generator().manual_seed(0)), 5)[4] - 0.4) < 0.02


def test_config_schedules_and_draw(batch_coords):
    c = MaskConfig()
    assert (c.kind, c.patch_size, c.ratio, c.schedule) == ("patch", 16, 0.4, "constant")
    assert MaskConfig.from_dict(c.to_dict()) == c
    cos = MaskConfig(schedule="cosine", ratio_start=0.0, ratio=0.6)
    vals = [cos.ratio_at(s, 100) for s in range(0, 101, 10)]
    assert vals[0] == 0.0 and abs(vals[-1] - 0.6) < 1e-12 and all(np.diff(vals) >= 0)
    assert abs(cos.ratio_at(50, 100) - 0.3) < 1e-12
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(c.draw(batch_coords, 5, 10, g1), patch_mask(batch_coords, 16, 0.4, g2))
    v = MaskConfig(kind="random_voxel").draw(batch_coords, generator=torch.Generator().manual_seed(0))
    assert abs(v.float().mean().item() - 0.4) < 1e-3
    assert not MaskConfig(schedule="linear", ratio_start=0.0).draw(batch_coords, 0, 10).any()  # ratio 0 at step 0
    with pytest.raises(MSMError, match="schedule must be one of"):
        MaskConfig(schedule="step")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(batch_coords):
    m_cpu = patch_mask(batch_coords, 8, 0.4, torch.Generator().manual_seed(2))
    m_gpu = patch_mask(batch_coords.cuda(), 8, 0.4, torch.Generator().manual_seed(2))
    assert m_gpu.is_cuda and torch.equal(m_gpu.cpu(), m_cpu)
    for (c0, l0), (c1, l1) in zip(level_masks(batch_coords, m_cpu, 5), level_masks(batch_coords.cuda(), m_gpu, 5)):
        assert torch.equal(c1.cpu(), c0) and torch.equal(l1.cpu(), l0)
    g = torch.Generator(device="cuda").manual_seed(2)
    assert patch_mask(batch_coords.cuda(), 8, 0.4, g).is_cuda
