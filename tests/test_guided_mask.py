"2D-guided masking (msm.masking, I2P-MAE): saliency, exact counts, salient patches visible, samplers and bad input."
import math

import numpy as np
import pytest
import torch

from msm.baselines import BaselineConfig, BaselineSampler, fake_feat2d
from msm.core import MSMError
from msm.data import synthetic_room
from msm.masking import MaskConfig, feature_saliency, guided_patch_mask, patch_mask
from msm.objective import PairSampler
from msm.transforms import default_pretrain_transform
from msm.voxelize import collate, voxelize_scene


@pytest.fixture(scope="module")
def rooms():
    return [synthetic_room(s, n_points=12_000) for s in (3, 4)]


@pytest.fixture(scope="module")
def batch(rooms):
    gen = torch.Generator().manual_seed(0)
    return collate([voxelize_scene(r, 0.02, "train", gen) for r in rooms])


def _patch_scores(coords, saliency, p):
    "Per scene: patch id of every voxel and the mean saliency of every patch (brute force)."
    out = []
    for b in torch.unique(coords[:, 0]).tolist():
        sel = coords[:, 0] == b
        cells = torch.div(coords[sel, 1:].long(), p, rounding_mode="floor")
        uniq, pid = torch.unique(cells, dim=0, return_inverse=True)
        score = torch.stack([saliency[sel][pid == k].double().mean() for k in range(len(uniq))])
        out.append((sel, pid, score))
    return out


def test_feature_saliency_matches_numpy_and_is_scale_free():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 5)) * [1, 3, 0.2, 7, 1] + [0, 5, -2, 0, 1]
    inv = rng.integers(0, 30, 200)
    vm = np.stack([f[inv == v].mean(0) for v in range(30)])
    want = np.sqrt((((vm - vm.mean(0)) / (vm.std(0) + 1e-6)) ** 2).mean(1))
    got = feature_saliency(f, torch.as_tensor(inv), 30)
    assert got.dtype == torch.float32 and got.shape == (30,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)  # float64 arithmetic, float32 output
    np.testing.assert_allclose(feature_saliency(f * [100, 1, 1, 0.01, 1] + 3, torch.as_tensor(inv), 30).numpy(),
                               want, rtol=1e-4)  # per-channel affine maps leave it unchanged (up to the 1e-6 guard)
    np.testing.assert_allclose(feature_saliency(f.astype(np.float16)).shape, (200,))  # per point without inverse


@pytest.mark.parametrize("p", [4, 16])
@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_same_count_as_random_and_hidden_are_least_salient(batch, p, temperature):
    coords = batch["coords"]
    sal = torch.rand(len(coords), generator=torch.Generator().manual_seed(3))
    mask = guided_patch_mask(coords, sal, p, 0.4, temperature, torch.Generator().manual_seed(5))
    rand = patch_mask(coords, p, 0.4, torch.Generator().manual_seed(5))
    for sel, pid, score in _patch_scores(coords, sal, p):
        hidden = torch.zeros(len(score), dtype=torch.bool)
        hidden[pid[mask[sel]]] = True
        assert bool((mask[sel] == hidden[pid]).all())  # whole patches
        n = len(score)
        assert int(hidden.sum()) == min(math.floor(0.4 * n + 0.5), n - 1)
        assert int(hidden.sum()) == len(torch.unique(pid[rand[sel]]))  # the same count as random patches
        if temperature == 0:
            assert score[hidden].max() <= score[~hidden].min()
        else:  # sampled: visible patches are clearly more salient on average, but not a hard cut
            assert score[~hidden].mean() > score[hidden].mean() + 0.5 * score.std()
            assert score[hidden].max() > score[~hidden].min()


def test_seeded_and_voxel_kind(batch):
    coords = batch["coords"]
    sal = torch.rand(len(coords), generator=torch.Generator().manual_seed(3))
    a = guided_patch_mask(coords, sal, 8, 0.3, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, guided_patch_mask(coords, sal, 8, 0.3, 0.5, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, guided_patch_mask(coords, sal, 8, 0.3, 0.5, torch.Generator().manual_seed(2)))
    cfg = MaskConfig(kind="random_voxel", strategy="guided2d", ratio=0.25, saliency_temperature=0.0)
    m = cfg.draw(coords, saliency=sal)
    for b in (0, 1):
        sel = coords[:, 0] == b
        assert int(m[sel].sum()) == math.floor(0.25 * int(sel.sum()) + 0.5)
        assert sal[sel][m[sel]].max() <= sal[sel][~m[sel]].min()


def test_bad_input(batch):
    coords = batch["coords"]
    with pytest.raises(MSMError, match="saliency must be float of shape"):
        guided_patch_mask(coords, torch.ones(3), 16, 0.4)
    with pytest.raises(MSMError, match="NaN"):
        guided_patch_mask(coords, torch.full((len(coords),), float("nan")), 16, 0.4)
    with pytest.raises(MSMError, match="temperature"):
        guided_patch_mask(coords, torch.ones(len(coords)), 16, 0.4, -1.0)
    with pytest.raises(MSMError, match="strategy must be one of"):
        MaskConfig(strategy="top")
    with pytest.raises(MSMError, match="saliency_temperature"):
        MaskConfig(saliency_temperature=float("inf"))
    with pytest.raises(MSMError, match="needs the per-voxel saliency"):
        MaskConfig(strategy="guided2d").draw(coords)
    with pytest.raises(MSMError, match="feat2d"):
        feature_saliency(np.zeros((4, 3, 2)))


def test_samplers_pass_feat2d(rooms):
    room = {**rooms[0], "feat2d": fake_feat2d(rooms[0], 16)}
    cfg = MaskConfig(patch_size=8, ratio=0.4, strategy="guided2d", saliency_temperature=0.0)
    sampler = PairSampler(default_pretrain_transform(6000), 0.04, 4, cfg)
    item = sampler(room, np.random.default_rng(0))[0]
    assert item["mask"] is not None and 0.2 < item["mask"].float().mean() < 0.6
    random_item = PairSampler(default_pretrain_transform(6000), 0.04, 4, MaskConfig(patch_size=8, ratio=0.4))(
        room, np.random.default_rng(0))[0]
    assert torch.equal(item["student"][0], random_item["student"][0])  # the same views: only the mask differs
    with pytest.raises(MSMError, match="feat2d.npy"):
        sampler(rooms[0], np.random.default_rng(0))
    b = BaselineSampler("distill2d", default_pretrain_transform(6000), 0.04, cfg, BaselineConfig(feat2d_dim=16))
    assert b(room, np.random.default_rng(0))[0]["views"][0]["mask"] is not None
    with pytest.raises(MSMError, match="mtp masks whole regions"):
        BaselineSampler("mtp", default_pretrain_transform(6000), 0.04, cfg, BaselineConfig())(room, np.random.default_rng(0))


def test_data_samples_ship_standin_feat2d():
    "The shipped feat2d.npy files are the stand-ins tools/make_feat2d_standins.py writes (train rooms, 8 channels)."
    from pathlib import Path

    from msm.data import list_scenes, load_scene

    root = Path(__file__).resolve().parents[1] / "data_samples"
    folders = list_scenes(root, "train")
    assert folders
    for folder in folders:
        scene = load_scene(folder)
        assert scene["feat2d"].dtype == np.float16
        np.testing.assert_array_equal(scene["feat2d"], fake_feat2d(scene, 8, 0))
