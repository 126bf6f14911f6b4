"""The evaluation protocol: multi-resolution sampling against a dense grid_sample reference and a dict lookup, its
memory on a 200k-point room, the official sampler's point features, the feature cache, the probes and run_probe."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msm.core import MSMError
from msm.data import save_scene, synthetic_room
from msm.hunet import HUNet, HUNetConfig
from msm.probe import (
    FeatureStore,
    ProbeConfig,
    confusion_matrix,
    extract_point_features,
    fit_linear_probe,
    knn_bank,
    knn_predict,
    run_probe,
    run_probes,
    sample_features,
    segmentation_metrics,
    write_point_features,
)
from msm.sparse import SparseTensor


def make_levels(n=4000, channels=(4, 5, 6, 7, 8), n_scenes=3, seed=0, box=(50, 37, 23), shift=None):
    "Random points on planes (floor, walls, a shelf) of n_scenes scenes and levels = the occupied floor(c / 2**i)."
    g = torch.Generator().manual_seed(seed)
    pts = torch.randint(0, 64, (n, 3), generator=g) % torch.tensor(box)
    plane = torch.randint(0, 4, (n,), generator=g)
    for k, (axis, value) in enumerate([(2, 0), (0, 0), (1, box[1] - 1), (2, 7)]):
        pts[plane == k, axis] = value
    b = torch.randint(0, n_scenes, (n,), generator=g)
    if shift is not None:  # scenes not starting at 0 (allowed for align="center")
        pts = pts + torch.tensor(shift)
    levels = []
    for i, c in enumerate(channels):
        vox = torch.unique(torch.cat([b[:, None], torch.div(pts, 2**i, rounding_mode="floor")], 1), dim=0).int()
        perm = torch.randperm(len(vox), generator=g)  # row order must not matter
        levels.append(SparseTensor(torch.randn(len(vox), c, generator=g, dtype=torch.float64).float(), vox[perm],
                                   stride=2**i))
    return pts, b, levels


def dense_reference(levels, pgc, batch, align, empty):
    "Per scene and level: a dense grid (and occupancy) over [min, max] and F.grid_sample (the official recipe)."
    out = []
    for lv in levels:
        res = torch.zeros(len(pgc), lv.feats.shape[1], dtype=torch.float64)
        for s in batch.unique().tolist():
            m, p = lv.coords[:, 0] == s, batch == s
            xyz = lv.coords[m, 1:].long()
            lo = xyz.min(0).values if align == "center" else torch.zeros(3, dtype=torch.long)
            S = xyz.max(0).values + 1 - lo
            grid = torch.zeros(1, lv.feats.shape[1] + 1, *S.tolist(), dtype=torch.float64)
            loc = xyz - lo
            grid[0, :-1, loc[:, 0], loc[:, 1], loc[:, 2]] = lv.feats[m].double().T
            grid[0, -1, loc[:, 0], loc[:, 1], loc[:, 2]] = 1.0
            # the point's position in the grid's own frame (origin lo), normalised for grid_sample
            g = (((pgc[p].double() + 0.5) / lv.stride - lo) / S * 2 - 1).flip(-1).view(1, -1, 1, 1, 3)
            r = F.grid_sample(grid, g, align_corners=(align == "official")).view(grid.shape[1], -1).T
            res[p] = r[:, :-1] / r[:, -1:].clamp_min(1e-12) if empty == "renormalize" else r[:, :-1]
        out.append(res)
    return torch.cat(out, 1)


@pytest.mark.parametrize("align", ["center", "official"])
@pytest.mark.parametrize("empty", ["zero", "renormalize"])
def test_trilinear_matches_dense_grid_sample(align, empty):
    pts, b, levels = make_levels()
    ours = sample_features(levels, pts, b, align=align, empty=empty, chunk=777)
    ref = dense_reference(levels, pts, b, align, empty)
    err = (ours.double() - ref).abs().max().item()
    print(f"\n{align}/{empty}: max |ours - dense grid_sample| = {err:.2e} over {ours.numel()} values")
    assert ours.shape == (len(pts), 30) and ours.dtype == torch.float32
    assert err < 1e-5
    if empty == "renormalize":
        assert err < 1e-5 and not torch.allclose(ours, sample_features(levels, pts, b, align=align))


def test_center_alignment_with_shifted_scenes():
    "align='center' does not assume grids start at 0 (negative and offset coordinates)."
    pts, b, levels = make_levels(n=1500, shift=(-37, 5, -3))
    ours = sample_features(levels, pts, b, empty="renormalize")
    assert (ours.double() - dense_reference(levels, pts, b, "center", "renormalize")).abs().max() < 1e-5
    with pytest.raises(MSMError, match="non-negative grid coordinates"):
        sample_features(levels, pts, b, align="official")


def test_nearest_matches_dict_lookup():
    pts, b, levels = make_levels(n=2000)
    ours = sample_features(levels, pts, b, method="nearest", chunk=300)
    cols = []
    for i, lv in enumerate(levels):
        table = {tuple(r): k for k, r in enumerate(lv.coords.tolist())}
        rows = [table[(s, *(v // 2**i for v in p))] for p, s in zip(pts.tolist(), b.tolist())]
        cols.append(lv.feats[rows])
    assert torch.equal(ours, torch.cat(cols, 1))
    # nearest ignores align / empty (the official 'nearest' variant has no shift)
    assert torch.equal(ours, sample_features(levels, pts, b, method="nearest", align="official", empty="renormalize"))


def test_batch_equals_scenes_one_at_a_time():
    pts, b, levels = make_levels(n=2500, n_scenes=3)
    for align in ("center", "official"):
        together = sample_features(levels, pts, b, align=align)
        for s in range(3):
            m = b == s
            single = [SparseTensor(lv.feats[lv.coords[:, 0] == s], torch.cat([torch.zeros_like(lv.coords[lv.coords[:, 0] == s, :1]),
                                   lv.coords[lv.coords[:, 0] == s, 1:]], 1), lv.stride) for lv in levels]
            assert torch.allclose(together[m], sample_features(single, pts[m], None, align=align), atol=1e-6)


def test_level_ids_and_bad_input():
    pts, b, levels = make_levels(n=500)
    full = sample_features(levels, pts, b)
    offs = np.cumsum([0] + [lv.feats.shape[1] for lv in levels])
    assert torch.equal(sample_features(levels, pts, b, level_ids=[2]), full[:, offs[2]:offs[3]])
    assert torch.equal(sample_features(levels, pts, b, level_ids=(4, 0)),
                       torch.cat([full[:, offs[4]:], full[:, :offs[1]]], 1))
    for kw, msg in [({"method": "cubic"}, "method must be one of"), ({"align": "corner"}, "align must be one of"),
                    ({"empty": "nan"}, "empty must be one of"), ({"level_ids": [5]}, "level_ids [5] must be")]:
        with pytest.raises(MSMError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            sample_features(levels, pts, b, **kw)
    with pytest.raises(MSMError, match="integer"):
        sample_features(levels, pts.float(), b)
    with pytest.raises(MSMError, match="non-empty list"):
        sample_features([], pts, b)
    with pytest.raises(MSMError, match="stride"):
        sample_features([type("L", (), {"feats": levels[0].feats, "coords": levels[0].coords, "stride": 0})()], pts, b)


def test_duck_typed_levels():
    "Anything with .feats / .coords / .stride works (e.g. levels rebuilt from saved tensors)."
    pts, b, levels = make_levels(n=800)

    class Level:
        def __init__(self, lv):
            self.feats, self.coords, self.stride = lv.feats, lv.coords.long(), lv.stride
    assert torch.equal(sample_features([Level(lv) for lv in levels], pts, b), sample_features(levels, pts, b))


MEMORY_SCRIPT = textwrap.dedent("""
    import gc, resource, sys, time
    import torch
    torch.set_num_threads(1)
    from msm.probe import sample_features
    from msm.sparse import SparseTensor

    g = torch.Generator().manual_seed(0)
    n, voxel = 200_000, 0.02
    # a 10 x 10 x 3 m room: floor, ceiling and four walls, points uniformly on them
    u = torch.rand(n, 3, generator=g) * torch.tensor([10.0, 10.0, 3.0])
    face = torch.randint(0, 6, (n,), generator=g)
    for k, (axis, value) in enumerate([(2, 0.0), (2, 3.0), (0, 0.0), (0, 10.0), (1, 0.0), (1, 10.0)]):
        u[face == k, axis] = value
    pgc = torch.floor(u / voxel).long()
    pgc -= pgc.min(0).values
    levels = []
    for i in range(5):
        vox = torch.unique(torch.div(pgc, 2**i, rounding_mode="floor"), dim=0)
        coords = torch.cat([torch.zeros(len(vox), 1, dtype=torch.long), vox], 1).int()
        levels.append(SparseTensor(torch.randn(len(coords), 16, generator=g), coords, stride=2**i))
    del u, face, vox, coords
    gc.collect()
    box = (pgc.max(0).values + 1).tolist()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    out = sample_features(levels, pgc, align=sys.argv[1])
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dense = box[0] * box[1] * box[2] * 16 * 4 / 2**20
    print(f"RESULT {n} {len(levels[0])} {out.shape[1]} {base:.0f} {peak:.0f} {dense:.0f} {dt:.2f} {box}")
""")


@pytest.mark.parametrize("align", ["center", "official"])
def test_memory_200k_points_never_dense(align):
    "200k points of a 10 x 10 x 3 m room: the peak memory grows by tens of MB, a dense 16-channel grid needs 2.4 GB."
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, align], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    n, m0, c, base, peak, dense, dt = line.split()[1:8]
    out_mb = int(n) * int(c) * 4 / 2**20
    print(f"\n{align}: {n} points, {m0} finest voxels, output {out_mb:.0f} MB; peak RSS {base} -> {peak} MB "
          f"(+{int(peak) - int(base)} MB) in {dt} s; one dense 16-channel level-0 grid would be {dense} MB")
    assert float(dense) > 2000  # the room's box really is big
    assert int(peak) - int(base) < out_mb + 250  # output + bounded per-chunk work, nowhere near a dense grid


REF = os.environ.get("MSM_OFFICIAL_REF")


@pytest.mark.skipif(not REF or not Path(REF).exists(), reason="set MSM_OFFICIAL_REF to an official-harness output")
def test_official_point_features_from_decoder_levels():
    "align='official' re-derives the official interpolation decoder's 928 point channels from its decoder levels."
    ref = torch.load(REF, map_location="cpu", weights_only=False)
    levels = [SparseTensor(d["features"].float(), d["indices"].int(), stride=2**i, check=False)
              for i, d in enumerate(ref["dec_levels"])]
    pgc = ref["voxelized"]["sample_grid_coord"]
    want = ref["point_feats"].float()
    ours = sample_features(levels, pgc, align="official")
    err = (ours - want).abs().max().item()
    center = (sample_features(levels, pgc) - want).abs().max().item()
    print(f"\nofficial: max |ours - official point_feats| = {err:.2e} (|ref| max {want.abs().max():.1f}); "
          f"align='center' differs by up to {center:.2f}")
    assert ours.shape == want.shape
    assert err < 1e-4
    assert center > 100 * err  # the shift is real


def test_metrics_by_hand():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2, 2, 0]), torch.tensor([0, 1, 2, 2, -1, 1]), 4)
    assert cm.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(cm, list("abcd"))
    iou = [1 / 2, 1 / 3, 1 / 2]
    assert math.isclose(m["miou"], sum(iou) / 3) and math.isclose(m["macc"], (1 + 0.5 + 0.5) / 3)
    assert math.isclose(m["oa"], 3 / 5) and m["per_class_iou"]["d"] is None and m["n_points"] == 5
    with pytest.raises(MSMError, match="label 5 outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([5]), 4)


@pytest.mark.parametrize("budget", [1e9, 20_000])
def test_feature_store_paths(tmp_path, budget):
    g = torch.Generator().manual_seed(0)
    scenes = [(torch.randn(400 + 50 * i, 6, generator=g) * 3 + 1, torch.randint(-1, 3, (400 + 50 * i,), generator=g))
              for i in range(4)]
    store = FeatureStore(budget, tmp_path / "cache")
    for f, y in scenes:
        store.add(f, y)
    kept = torch.cat([f[y >= 0] for f, y in scenes])
    labels = torch.cat([y[y >= 0] for _, y in scenes])
    assert store.on_disk == (budget < 1e6) and len(store) == len(kept)
    if store.on_disk:
        files = sorted((tmp_path / "cache").glob("part_*.npy"))
        assert len(files) == 4 and np.load(files[0], mmap_mode="r").dtype == np.float16
    idx = torch.randint(len(store), (1000,), generator=g)
    x, y = store.gather(idx)
    assert torch.equal(y, labels[idx])
    assert torch.allclose(x, kept[idx], atol=0 if not store.on_disk else 1e-2, rtol=1e-3)
    mean, std = store.mean_std()
    assert torch.allclose(mean, kept.mean(0), atol=1e-5) and torch.allclose(std, kept.std(0, unbiased=False), atol=1e-5)
    store.close()
    assert (tmp_path / "cache").exists() == store.on_disk  # a folder the caller gave is kept (made only when needed)


def _blobs(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centres = torch.eye(4, 8) * 3
    return centres[y] + torch.randn(n, 8, generator=g), y


def test_linear_probe_learns_and_is_deterministic():
    from msm.probe import _store_batches
    x, y = _blobs()
    store = FeatureStore()
    store.add(x, y)
    cfg = ProbeConfig(epochs=40, batch_points=1024, progress=False)  # 160 steps at lr 0.01
    spe = math.ceil(len(store) / cfg.batch_points)
    heads = [fit_linear_probe(_store_batches(store, cfg.batch_points, cfg.seed), cfg.epochs * spe, 8, 4, cfg,
                              *store.mean_std(), steps_per_epoch=spe) for _ in range(2)]
    assert torch.equal(heads[0].weight, heads[1].weight) and torch.equal(heads[0].bias, heads[1].bias)
    acc = (heads[0](x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc
    other = fit_linear_probe(_store_batches(store, 1024, 1), cfg.epochs * spe, 8, 4, ProbeConfig(seed=1, progress=False))
    assert not torch.equal(other.weight, heads[0].weight)


def test_lr_schedule():
    from msm.probe import _lr_factor
    f = [_lr_factor(s, 10, 100) for s in range(100)]
    assert math.isclose(f[0], 0.1) and math.isclose(f[9], 1.0) and math.isclose(f[10], 1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01


def test_knn_matches_bruteforce():
    x, y = _blobs(2000)
    store = FeatureStore()
    store.add(x, y)
    bank, by = knn_bank(store, 4, max_per_class=150, seed=0)
    assert torch.bincount(by).tolist() == [150] * 4
    q = torch.randn(300, 8) + torch.eye(4, 8)[torch.arange(300) % 4] * 3
    sim = F.normalize(q, dim=1) @ bank.T  # (300, 600): the whole matrix
    top = sim.topk(9, dim=1)
    votes = torch.zeros(300, 4, dtype=torch.float64).scatter_add_(1, by[top.indices], torch.exp(top.values.double() / 0.05))
    for block in (600, 6000, 10**8):  # 1, 10 and all queries per block
        assert torch.equal(knn_predict(q, bank, by, 4, k=9, temperature=0.05, block=block), votes.argmax(1))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    "A data root with 2 train + 1 val synthetic rooms (4000 points)."
    root = tmp_path_factory.mktemp("probe_root")
    for i, split in enumerate(["train", "train", "val"]):
        save_scene(synthetic_room(i, n_points=4000), root / split / f"room_{i}")
    return root


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return HUNet(HUNetConfig.tiny())


def test_extract_point_features(tiny_net):
    room = synthetic_room(5, n_points=3000)
    f = extract_point_features(tiny_net, room)
    assert f.shape == (3000, sum(HUNetConfig.tiny().dec_channels))
    assert torch.equal(f, extract_point_features(tiny_net, room))  # deterministic (curve shuffle off, eval)
    assert tiny_net.training and tiny_net.config.shuffle_curves  # restored
    # the finest level at 'center' is the point's own voxel's feature: points sharing a voxel share it
    only0 = extract_point_features(tiny_net, room, levels=[0])
    assert torch.equal(only0, f[:, :24])
    moved = dict(room, coord=room["coord"] + np.float32([3.0, -2.0, 1.0]))  # the centre shift removes translations
    assert torch.allclose(extract_point_features(tiny_net, moved), f, atol=1e-4)
    frag = extract_point_features(tiny_net, room, fragments=3)
    assert frag.shape == f.shape and not torch.equal(frag, f)
    with pytest.raises(MSMError, match="fragments"):
        extract_point_features(tiny_net, room, fragments=-1)


@pytest.mark.parametrize("mode", ["linear", "knn"])
def test_run_probe_end_to_end(tiny_root, tiny_net, tmp_path, mode):
    cfg = ProbeConfig(epochs=3, batch_points=4096, knn_max_per_class=500, progress=False)
    res = run_probe(tiny_net, tiny_root, mode=mode, out_dir=tmp_path, config=cfg)
    saved = json.loads((tmp_path / "probe.json").read_text())
    for k in ("miou", "macc", "oa", "per_class_iou", "config", "timings"):
        assert k in saved
    assert saved["miou"] == res["miou"] and 0 < res["miou"] <= 1 and res["oa"] > 0.2
    assert len(res["per_class_iou"]) == 20 and "wall" in res["per_class_iou"]  # ScanNet-20 from segment20.npy
    assert (tmp_path / "confusion.png").exists()
    assert sum(map(sum, res["confusion"])) == res["n_points"] == 4000 - int((synthetic_room(2, n_points=4000)["segment"] < 0).sum())
    assert run_probe(tiny_net, tiny_root, mode=mode, config=cfg)["miou"] == res["miou"]  # reproducible


def test_run_probes_share_one_feature_pass(tiny_root, tiny_net, tmp_path):
    cfg = ProbeConfig(epochs=3, batch_points=4096, knn_max_per_class=500, progress=False)
    both = run_probes(tiny_net, tiny_root, ("linear", "knn"), out_dir=tmp_path, config=cfg)
    for mode in ("linear", "knn"):  # the same numbers as one run_probe per mode
        alone = run_probe(tiny_net, tiny_root, mode=mode, config=cfg)
        assert both[mode]["confusion"] == alone["confusion"] and both[mode]["mode"] == mode
        assert json.loads((tmp_path / mode / "probe.json").read_text())["miou"] == alone["miou"]
        assert (tmp_path / mode / "confusion.png").exists()
    assert both["linear"]["timings"]["train_features_s"] == both["knn"]["timings"]["train_features_s"]
    fly = ProbeConfig(**{**cfg.to_dict(), "on_the_fly": True, "crop_points": 3000})  # kNN still gets its cache
    assert 0 < run_probes(tiny_net, tiny_root, ("linear", "knn"), config=fly)["knn"]["miou"] <= 1
    with pytest.raises(MSMError, match="mode must be"):
        run_probes(tiny_net, tiny_root, ("linear", "svm"), config=cfg)
    with pytest.raises(MSMError, match="mode must be"):
        run_probes(tiny_net, tiny_root, (), config=cfg)


def test_run_probe_disk_cache_and_on_the_fly(tiny_root, tiny_net, tmp_path):
    base = ProbeConfig(epochs=3, batch_points=4096, progress=False)
    mem = run_probe(tiny_net, tiny_root, config=base)
    disk = run_probe(tiny_net, tiny_root, config=ProbeConfig(**{**base.to_dict(), "cache_budget_gb": 1e-6,
                                                                   "cache_dir": str(tmp_path / "c")}))
    assert len(list((tmp_path / "c").glob("part_*.npy"))) == 2  # one float16 memmap per training room
    assert abs(disk["miou"] - mem["miou"]) < 0.05  # same batches, float16 features
    fly = run_probe(tiny_net, tiny_root, config=ProbeConfig(**{**base.to_dict(), "on_the_fly": True, "crop_points": 3000}))
    assert 0 < fly["miou"] <= 1


def test_run_probe_bad_input(tiny_root, tiny_net, tmp_path):
    cfg = ProbeConfig(epochs=1, progress=False)
    with pytest.raises(MSMError, match="no 'test' split folder"):
        run_probe(tiny_net, tiny_root, config=cfg, val_split="test")
    with pytest.raises(MSMError, match="mode must be"):
        run_probe(tiny_net, tiny_root, mode="svm", config=cfg)
    with pytest.raises(MSMError, match="class names for"):
        run_probe(tiny_net, tiny_root, config=cfg, n_classes=20, class_names=["a", "b"])
    for split in ("train", "val"):
        r = synthetic_room(7, n_points=1500)
        r.pop("segment")
        save_scene(r, tmp_path / "nolabels" / split / "room")
        r = synthetic_room(7, n_points=1500)
        r["segment"][:] = -1
        save_scene(r, tmp_path / "ignored" / split / "room")
    with pytest.raises(MSMError, match="no semantic labels"):
        run_probe(tiny_net, tmp_path / "nolabels", config=cfg)
    with pytest.raises(MSMError, match="no labelled points"):
        run_probe(tiny_net, tmp_path / "ignored", config=cfg)
    with pytest.raises(MSMError, match="data root not found"):
        run_probe(tiny_net, tmp_path / "nowhere", config=cfg)


def test_write_point_features(tiny_net, tiny_root, tmp_path):
    scene = tiny_root / "val" / "room_2"
    out = write_point_features(tiny_net, scene, tmp_path / "sub" / "feats.npy")
    a = np.load(out)
    assert a.dtype == np.float32 and a.shape == (4000, sum(HUNetConfig.tiny().dec_channels))
    half = np.load(write_point_features(tiny_net, scene, tmp_path / "half", dtype="float16"))
    assert half.dtype == np.float16 and np.allclose(half, a, atol=1e-2, rtol=1e-2)
    with pytest.raises(MSMError, match="dtype must be"):
        write_point_features(tiny_net, scene, tmp_path / "x.npy", dtype="int8")
    with pytest.raises(MSMError, match="no such file"):
        write_point_features(tiny_net, tmp_path / "missing", tmp_path / "x.npy")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sample_features_cuda_equals_cpu():
    pts, b, levels = make_levels()
    for align in ("center", "official"):
        cpu = sample_features(levels, pts, b, align=align)
        gpu = sample_features([lv.to("cuda") for lv in levels], pts.cuda(), b.cuda(), align=align)
        assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-5)


def test_probe_keeps_the_feature_names():
    "msm.probe.sample_features is a stable, documented name: the sampling lives in msm.features, re-exported here."
    import msm.features
    import msm.probe
    assert msm.probe.sample_features is msm.features.sample_features
    assert msm.probe.extract_point_features is msm.features.extract_point_features
    assert {"sample_features", "extract_point_features"} <= set(msm.probe.__all__)
