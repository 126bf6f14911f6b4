"""grid_sample and friends against a brute-force reference (a Python dict of grid tuple -> point ids)."""

import numpy as np
import pytest
import torch

from msm.core import MSMError
from msm.voxelize import KEY_BITS, collate, grid_sample, input_features, voxel_mean, voxelize_scene


def naive_voxels(coord, voxel_size):
    "{grid tuple: list of point ids (ascending)}, grid = floor(coord / voxel_size) - min in float64."
    g = np.floor(np.asarray(coord, np.float64) / voxel_size).astype(np.int64)
    g -= g.min(0)
    out = {}
    for i, key in enumerate(map(tuple, g.tolist())):
        out.setdefault(key, []).append(i)
    return out


def check(coord, voxel_size, vox, first=False):
    ref = naive_voxels(coord, voxel_size)
    gc = [tuple(r) for r in vox.grid_coord.cpu().tolist()]
    assert vox.grid_coord.dtype == torch.int32 and vox.index.dtype == torch.int64 and vox.inverse.dtype == torch.int64
    assert len(gc) == len(ref) and set(gc) == set(ref)
    assert gc == sorted(gc), "voxels must be sorted by (x, y, z)"
    index, inverse, counts = vox.index.cpu().tolist(), vox.inverse.cpu().tolist(), vox.counts.cpu().tolist()
    for v, key in enumerate(gc):
        assert index[v] in ref[key]
        assert counts[v] == len(ref[key])
        if first:
            assert index[v] == ref[key][0]
    for v, key in enumerate(gc):
        for i in ref[key]:
            assert inverse[i] == v
    assert len(inverse) == len(coord)


def random_cloud(rng, n, scale, offset=0.0, dtype=np.float32):
    return (rng.random((n, 3)) * scale + offset).astype(dtype)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["train", "first"])
def test_random_clouds(seed, mode):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    coord = random_cloud(rng, n, scale=rng.uniform(0.1, 3.0, 3), offset=rng.uniform(-5, 5, 3))
    vs = float(rng.choice([0.02, 0.05, 0.1, 0.3]))
    check(coord, vs, grid_sample(coord, vs, mode, torch.Generator().manual_seed(seed)), first=mode == "first")


def test_duplicates_and_single_point():
    coord = np.repeat(np.array([[0.5, -0.3, 2.0]], np.float32), 50, 0)
    vox = grid_sample(coord, 0.02, "train", torch.Generator().manual_seed(0))
    assert vox.num_voxels == 1 and vox.counts.tolist() == [50] and vox.grid_coord.tolist() == [[0, 0, 0]]
    assert (vox.inverse == 0).all()
    frags = grid_sample(coord, 0.02, "test", torch.Generator().manual_seed(0))
    assert len(frags) == 50
    assert sorted(f.index.item() for f in frags) == list(range(50))  # each point exactly once, random order
    one = grid_sample(np.array([[1.0, 2.0, 3.0]]), 0.02, "first")
    assert one.grid_coord.tolist() == [[0, 0, 0]] and one.index.tolist() == [0] and one.inverse.tolist() == [0]
    # mixture of duplicates and distinct points
    rng = np.random.default_rng(1)
    base = random_cloud(rng, 40, 1.0)
    coord = base[rng.integers(0, 40, 400)]
    check(coord, 0.05, grid_sample(coord, 0.05, "first"), first=True)


def test_negative_coordinates():
    rng = np.random.default_rng(2)
    coord = random_cloud(rng, 2000, 2.0, offset=-7.3)
    check(coord, 0.04, grid_sample(coord, 0.04, "first"), first=True)
    vox = grid_sample(coord, 0.04, "first")
    expect = np.floor(coord.astype(np.float64) / 0.04).astype(np.int64)
    expect -= expect.min(0)
    assert np.array_equal(vox.grid_coord.numpy()[vox.inverse.numpy()], expect)


def test_float32_boundaries():
    # multiples of 0.25 are exact in float32: a point on a boundary belongs to the voxel above it
    k = np.arange(-8, 9, dtype=np.float32)
    on = np.stack([k * 0.25, np.zeros_like(k), np.zeros_like(k)], 1)
    below = on.copy()
    below[:, 0] = np.nextafter(on[:, 0], np.float32(-np.inf))
    coord = np.concatenate([on, below])
    vox = grid_sample(coord, 0.25, "first")
    check(coord, 0.25, vox, first=True)
    gx = vox.grid_coord[vox.inverse, 0].numpy()
    assert np.array_equal(gx[: len(k)] - gx[len(k):], np.ones(len(k)))  # just below the boundary: one voxel lower
    # non-representable sizes: the answer is the float64 quotient of the float32 values
    vals = (np.arange(-300, 300) * np.float32(0.02)).astype(np.float32)
    coord = np.stack([vals, vals[::-1], np.zeros_like(vals)], 1)
    check(coord, 0.02, grid_sample(coord, 0.02, "first"), first=True)


def test_extent_limit():
    top = 2**KEY_BITS - 1
    ok = np.array([[0, 0, 0], [top, 0, 0], [0, top, 0], [0, 0, top], [top, top, top]], np.float64)
    vox = grid_sample(ok, 1.0, "first")
    assert vox.num_voxels == 5  # extreme corners do not collide in the packed key
    check(ok, 1.0, vox, first=True)
    with pytest.raises(MSMError, match="at most 2097152 fit the 21-bit key"):
        grid_sample(np.array([[0, 0, 0], [top + 1, 0, 0]], np.float64), 1.0)
    with pytest.raises(MSMError, match="use a larger voxel_size"):
        grid_sample(np.array([[0, 0, 0], [0, 0, 1e9]], np.float32), 0.02)
    # large absolute coordinates with a small extent are fine
    rng = np.random.default_rng(3)
    coord = random_cloud(rng, 500, 1.0, offset=1e4, dtype=np.float64)
    check(coord, 0.02, grid_sample(coord, 0.02, "first"), first=True)


def test_bad_input():
    good = np.zeros((4, 3), np.float32)
    with pytest.raises(MSMError, match=r"shape \(N, 3\)"):
        grid_sample(np.zeros((4, 2)), 0.02)
    with pytest.raises(MSMError, match=r"shape \(N, 3\)"):
        grid_sample(np.zeros(3), 0.02)
    with pytest.raises(MSMError, match="empty"):
        grid_sample(np.zeros((0, 3)), 0.02)
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(MSMError, match=r"1 point\(s\) with NaN or inf coordinates \(first at row 2\)"):
        grid_sample(bad, 0.02)
    bad[2, 1] = np.inf
    with pytest.raises(MSMError, match="NaN or inf"):
        grid_sample(torch.from_numpy(bad), 0.02)
    for vs in (0, -0.02, float("nan"), float("inf"), "big", None):
        with pytest.raises(MSMError, match="voxel_size must be a positive number"):
            grid_sample(good, vs)
    with pytest.raises(MSMError, match="mode must be"):
        grid_sample(good, 0.02, mode="random")
    with pytest.raises(MSMError, match="array of numbers"):
        grid_sample([["a", "b", "c"]], 0.02)


def test_input_types():
    rng = np.random.default_rng(4)
    coord = random_cloud(rng, 300, 1.0)
    ref = grid_sample(coord, 0.1, "first")
    for c in (coord.astype(np.float64), torch.from_numpy(coord.astype(np.float64)), torch.from_numpy(coord)):
        before = c.copy() if isinstance(c, np.ndarray) else c.clone()
        grid_sample(c, 0.1, "train")
        assert (before == c).all(), "the input must not be modified"
    for c in (torch.from_numpy(coord), torch.from_numpy(coord.astype(np.float64)), coord.tolist(),
              np.asfortranarray(coord), torch.from_numpy(coord).half().float()):
        got = grid_sample(c, 0.1, "first")
        assert isinstance(got.index, torch.Tensor)
        assert torch.equal(got.index, ref.index) and torch.equal(got.inverse, ref.inverse)
    ints = np.array([[0, 0, 0], [1, 1, 1], [3, 0, 0]], np.int32)
    check(ints, 2.0, grid_sample(ints, 2.0, "first"), first=True)


def test_train_mode_uniform_and_deterministic():
    coord = np.array([[0.01, 0.01, 0.01]] * 4 + [[0.5, 0.5, 0.5]] * 2, np.float32)
    picks = np.zeros(6, int)
    for seed in range(800):
        vox = grid_sample(coord, 0.1, "train", torch.Generator().manual_seed(seed))
        picks[vox.index.numpy()] += 1
    assert picks.sum() == 1600
    assert all(140 <= p <= 260 for p in picks[:4]), picks  # expected 200 each
    assert all(330 <= p <= 470 for p in picks[4:]), picks  # expected 400 each
    rng = np.random.default_rng(5)
    cloud = random_cloud(rng, 5000, 1.0)
    a = grid_sample(cloud, 0.05, "train", torch.Generator().manual_seed(9))
    b = grid_sample(cloud, 0.05, "train", torch.Generator().manual_seed(9))
    assert torch.equal(a.index, b.index)
    frags_a = grid_sample(cloud, 0.05, "test", torch.Generator().manual_seed(9))
    frags_b = grid_sample(cloud, 0.05, "test", torch.Generator().manual_seed(9))
    assert all(torch.equal(x.index, y.index) for x, y in zip(frags_a, frags_b))


def test_test_fragments():
    rng = np.random.default_rng(6)
    coord = random_cloud(rng, 3000, 0.6)
    frags = grid_sample(coord, 0.05, "test", torch.Generator().manual_seed(0))
    ref = naive_voxels(coord, 0.05)
    assert len(frags) == max(len(v) for v in ref.values())
    for f in frags:
        check(coord, 0.05, f)
        assert torch.equal(f.grid_coord, frags[0].grid_coord) and torch.equal(f.inverse, frags[0].inverse)
    # voxel v, fragment k keeps point k mod count of a fixed random order: all points of a voxel appear
    picks = torch.stack([f.index for f in frags], 1)  # (M, K)
    for v, key in enumerate(map(tuple, frags[0].grid_coord.tolist())):
        count = len(ref[key])
        assert sorted(picks[v, :count].tolist()) == ref[key]
        assert picks[v].tolist() == [picks[v, k % count].item() for k in range(len(frags))]


def test_voxel_mean_and_features():
    rng = np.random.default_rng(7)
    coord = random_cloud(rng, 1000, 1.0)
    values = rng.normal(size=(1000, 5)).astype(np.float32)
    vox = grid_sample(coord, 0.2, "first")
    mean = voxel_mean(values, vox.inverse, vox.num_voxels)
    ref = naive_voxels(coord, 0.2)
    for v, key in enumerate(map(tuple, vox.grid_coord.tolist())):
        np.testing.assert_allclose(mean[v].numpy(), values[ref[key]].mean(0), rtol=1e-5, atol=1e-6)
    lab = voxel_mean(np.ones(1000, np.int64), vox.inverse, vox.num_voxels)
    assert lab.dtype == torch.float32 and torch.allclose(lab, torch.ones(vox.num_voxels))
    with pytest.raises(MSMError, match="1000 inverse entries"):
        voxel_mean(values[:10], vox.inverse, vox.num_voxels)
    f = input_features(np.array([[255, 0, 127.5]], np.float32), np.array([[np.nan, np.inf, 1]], np.float32))
    assert f.tolist() == [[1.0, -1.0, 0.0, 0.0, 0.0, 1.0]]


def _scene(rng, n):
    return {"coord": random_cloud(rng, n, 2.0), "color": rng.integers(0, 256, (n, 3)).astype(np.float32),
            "normal": rng.normal(size=(n, 3)).astype(np.float32), "segment": rng.integers(-1, 5, n)}


def test_voxelize_scene_and_collate():
    rng = np.random.default_rng(8)
    scenes = [_scene(rng, n) for n in (500, 1, 800)]
    vox = [voxelize_scene(s, 0.1, "train", torch.Generator().manual_seed(i)) for i, s in enumerate(scenes)]
    for s, v in zip(scenes, vox):
        check(s["coord"], 0.1, grid_sample(s["coord"], 0.1, "first"), first=True)
        idx = v["index"].numpy()
        assert torch.equal(v["feat"], input_features(s["color"][idx], s["normal"][idx]))
        assert torch.equal(v["segment"], torch.from_numpy(s["segment"])[v["index"]])
        assert torch.equal(v["coord"], torch.from_numpy(s["coord"])[v["index"]])
    bt = collate(vox)
    m = [len(v["grid_coord"]) for v in vox]
    assert bt["offsets"].tolist() == [0, m[0], m[0] + m[1], sum(m)]
    assert bt["point_offsets"].tolist() == [0, 500, 501, 1301]
    assert bt["coords"].dtype == torch.int32 and bt["coords"].shape == (sum(m), 4)
    assert bt["coords"][:, 0].tolist() == [0] * m[0] + [1] * m[1] + [2] * m[2]
    assert bt["feats"].shape == (sum(m), 6)
    for b, v in enumerate(vox):
        p0, p1 = bt["point_offsets"][b], bt["point_offsets"][b + 1]
        o0 = bt["offsets"][b]
        assert torch.equal(bt["inverse"][p0:p1], v["inverse"] + o0)
        assert torch.equal(bt["index"][o0:o0 + m[b]], v["index"] + p0)
    assert torch.equal(bt["point_segment"][bt["index"]], bt["segment"])
    assert torch.equal(bt["feats"][bt["inverse"]][:500], vox[0]["feat"][vox[0]["inverse"]])
    with pytest.raises(MSMError, match="empty batch"):
        collate([])
    with pytest.raises(MSMError, match="has 3 rows but 'coord' has 500"):
        voxelize_scene(dict(scenes[0], segment=np.zeros(3, np.int64)), 0.1)
    with pytest.raises(MSMError, match="features must be"):
        voxelize_scene(scenes[0], 0.1, features="max")


def test_views_match_through_origin_index():
    from msm.transforms import default_pretrain_transform, two_views
    rng = np.random.default_rng(9)
    scene = _scene(rng, 4000)
    va, vb = two_views(scene, default_pretrain_transform(crop_points=3000), np.random.default_rng(0))
    xa, xb = voxelize_scene(va, 0.05, "train"), voxelize_scene(vb, 0.05, "train")
    assert torch.equal(xa["point_origin_index"], torch.from_numpy(va["index"]))
    assert torch.equal(xa["origin_index"], torch.from_numpy(va["index"])[xa["index"]])
    shared, ia, ib = np.intersect1d(va["index"], vb["index"], return_indices=True)
    assert len(shared) > 0
    # a shared original point has one voxel in each view; its colour went through different jitter, its label not
    assert torch.equal(xa["point_segment"][ia], xb["point_segment"][ib])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(10)
    coord = random_cloud(rng, 200_000, [10.0, 10.0, 3.0], offset=-4.0)
    cpu = grid_sample(coord, 0.02, "first")
    gpu = grid_sample(torch.from_numpy(coord).cuda(), 0.02, "first")
    assert gpu.index.is_cuda and gpu.inverse.is_cuda
    for a, b in zip((cpu.grid_coord, cpu.index, cpu.inverse, cpu.counts), (gpu.grid_coord, gpu.index, gpu.inverse,
                                                                            gpu.counts)):
        assert torch.equal(a, b.cpu())
    for gen in (torch.Generator("cuda").manual_seed(0), torch.Generator().manual_seed(0)):
        tr = grid_sample(torch.from_numpy(coord).cuda(), 0.02, "train", gen)
        assert torch.equal(tr.inverse.cpu(), cpu.inverse)
        assert torch.equal(tr.inverse[tr.index], torch.arange(tr.num_voxels, device="cuda"))
    frags = grid_sample(torch.from_numpy(coord[:2000]).cuda(), 0.2, "test", torch.Generator("cuda").manual_seed(0))
    check(coord[:2000], 0.2, frags[-1])
    small = coord[:3000]
    check(small, 0.1, grid_sample(torch.from_numpy(small).cuda(), 0.1, "first"), first=True)
    sc = {k: torch.as_tensor(v).cuda() for k, v in _scene(rng, 1000).items()}
    v = voxelize_scene(sc, 0.1, "train", torch.Generator("cuda").manual_seed(0))
    assert v["feat"].is_cuda and v["grid_coord"].is_cuda
    bt = collate([v, v])
    assert bt["coords"].is_cuda and bt["inverse"].is_cuda
