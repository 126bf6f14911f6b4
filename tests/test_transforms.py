"""Transforms: index bookkeeping through whole pipelines, extras, determinism, normals, colour range."""

import numpy as np
import pytest

from msm.core import MSMError
from msm.transforms import (
    CenterShift,
    Compose,
    RandomDropColor,
    RandomFlip,
    RandomRotate,
    RandomRotateZ,
    RandomScale,
    SphereCrop,
    default_eval_transform,
    default_pretrain_transform,
    two_views,
)


def scene(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(n, 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    normal[:5] = 0  # unknown normals
    return {"coord": (rng.random((n, 3)) * [6, 5, 3]).astype(np.float32),
            "color": rng.integers(0, 256, (n, 3)).astype(np.float32), "normal": normal.astype(np.float32),
            "segment": rng.integers(-1, 20, n), "feat2d": rng.normal(size=(n, 8)).astype(np.float32),
            "name": "room_0"}


def test_pretrain_pipeline_bookkeeping_and_determinism():
    s = scene()
    frozen = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
    tf = default_pretrain_transform(crop_points=1000)
    va, vb = two_views(s, tf, np.random.default_rng(1))
    for v in (va, vb):
        assert len(v["coord"]) == 1000 and v["index"].dtype == np.int64
        assert len(np.unique(v["index"])) == 1000
        for k in ("segment", "feat2d", "color", "normal"):
            assert len(v[k]) == 1000
        np.testing.assert_array_equal(v["segment"], s["segment"][v["index"]])
        np.testing.assert_array_equal(v["feat2d"], s["feat2d"][v["index"]])
        assert v["name"] == "room_0"
        assert v["coord"].dtype == np.float32 and v["color"].dtype == np.float32
        assert v["color"].min() >= 0 and v["color"].max() <= 255
        length = np.linalg.norm(v["normal"], axis=1)
        known = np.linalg.norm(s["normal"][v["index"]], axis=1) > 0
        np.testing.assert_allclose(length[known], 1.0, atol=1e-5)
        assert (length[~known] == 0).all()
    assert not np.array_equal(np.sort(va["index"]), np.sort(vb["index"]))  # independent crops
    for k, v in frozen.items():  # the input scene is untouched
        assert np.array_equal(s[k], v) if isinstance(v, np.ndarray) else s[k] == v
    va2, vb2 = two_views(s, tf, np.random.default_rng(1))
    for k in ("coord", "color", "normal", "index"):
        np.testing.assert_array_equal(va[k], va2[k])
        np.testing.assert_array_equal(vb[k], vb2[k])
    va3, _ = two_views(s, tf, np.random.default_rng(2))
    assert not np.array_equal(va3["index"], va["index"])


def test_rigid_views_are_orthogonal_maps_of_the_original():
    s = scene(seed=3)
    tf = Compose([CenterShift(), RandomRotateZ(), RandomRotate(angle=(-0.2, 0.2), axis="y"), RandomFlip(p=0.5),
                  RandomScale(scale=(1.0, 1.0)), SphereCrop(800), CenterShift(apply_z=False)])
    for seed in range(5):
        v = tf(s, np.random.default_rng(seed))
        src = s["coord"][v["index"]].astype(np.float64)
        dst = v["coord"].astype(np.float64)
        src_c, dst_c = src - src.mean(0), dst - dst.mean(0)  # translations removed
        m, *_ = np.linalg.lstsq(src_c, dst_c, rcond=None)
        np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-4)
        np.testing.assert_allclose(src_c @ m, dst_c, atol=1e-4)
        np.testing.assert_allclose(s["normal"][v["index"]] @ m, v["normal"], atol=1e-4)


def test_sphere_crop_keeps_nearest():
    s = scene(seed=4)
    c = s["coord"].astype(np.float64)
    v = SphereCrop(700, mode="random")(s, np.random.default_rng(5))
    ctr = c[np.random.default_rng(5).integers(len(c))]  # the crop's first draw picks its centre point
    d = np.linalg.norm(c - ctr, axis=1)
    kept = np.zeros(len(c), bool)
    kept[v["index"]] = True
    assert kept.sum() == 700 and d[kept].max() <= d[~kept].min()
    v = SphereCrop(700, mode="center")(s, np.random.default_rng(0))
    mid = (c.min(0) + c.max(0)) / 2
    ctr = c[np.argmin(((c - mid) ** 2).sum(1))]
    d = np.linalg.norm(c - ctr, axis=1)
    kept = np.zeros(len(c), bool)
    kept[v["index"]] = True
    assert kept.sum() == 700 and d[kept].max() <= d[~kept].min()
    whole = SphereCrop(10_000)(s, np.random.default_rng(0))
    np.testing.assert_array_equal(whole["index"], np.arange(len(c)))


def test_eval_transform_and_errors():
    s = scene()
    e = default_eval_transform()(s, np.random.default_rng(0))
    assert abs(float(e["coord"][:, 2].min())) < 1e-6
    np.testing.assert_allclose(e["coord"].min(0)[:2] + e["coord"].max(0)[:2], 0, atol=1e-5)
    d = RandomDropColor(p=1.0)(s, np.random.default_rng(0))
    assert (d["color"] == 127.5).all()
    with pytest.raises(MSMError, match="rng must be a np.random.Generator"):
        CenterShift()(s, 3)
    with pytest.raises(MSMError, match="'coord'"):
        CenterShift()({"color": s["color"]}, np.random.default_rng(0))
    with pytest.raises(MSMError, match="max_points must be >= 1"):
        SphereCrop(0)(s, np.random.default_rng(0))
    with pytest.raises(MSMError, match="axes must be among"):
        RandomFlip(axes=("w",))(s, np.random.default_rng(0))
