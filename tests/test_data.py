"""Scene I/O, data sets and synthetic rooms (msm.data, msm.rooms): bad inputs per format, round trips, parsing quirks,
generator invariants and the committed data_samples/."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from msm.core import MSMError
from msm.data import (
    S3DIS_CLASSES,
    SCANNET20_CLASSES,
    SceneDataset,
    list_scenes,
    load_scene,
    make_samples,
    save_scene,
    synthetic_room,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture
def scene():
    rng = np.random.default_rng(0)
    n = 64
    normal = rng.normal(size=(n, 3))
    return {"coord": rng.uniform(-2, 2, (n, 3)).astype(np.float32),
            "color": rng.integers(0, 256, (n, 3)).astype(np.float32),
            "normal": (normal / np.linalg.norm(normal, axis=1, keepdims=True)).astype(np.float32),
            "segment": rng.integers(-1, 20, n), "instance": rng.integers(-1, 7, n)}


def _write_ply(path, scene, text=False, float_color=False, label="label", normals=True, color=True):
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    fields += [(c, "f4") for c in ("nx", "ny", "nz")] if normals else []
    fields += [(c, "f4" if float_color else "u1") for c in ("red", "green", "blue")] if color else []
    fields += [(label, "i4")] if label else []
    v = np.zeros(len(scene["coord"]), fields)
    for i, c in enumerate("xyz"):
        v[c] = scene["coord"][:, i]
        if normals:
            v["n" + c] = scene["normal"][:, i]
    if color:
        for i, c in enumerate(("red", "green", "blue")):
            v[c] = scene["color"][:, i] / 255 if float_color else scene["color"][:, i]
    if label:
        v[label] = scene["segment"]
    PlyData([PlyElement.describe(v, "vertex")], text=text).write(str(path))
    return path


# ---------------------------------------------------------------- round trips

def test_save_load_round_trip(tmp_path, scene):
    folder = save_scene(scene, tmp_path / "a" / "scene0")
    assert sorted(p.name for p in folder.iterdir()) == ["color.npy", "coord.npy", "instance.npy", "normal.npy",
                                                      "segment20.npy"]
    assert np.load(folder / "color.npy").dtype == np.uint8
    assert np.load(folder / "segment20.npy").dtype == np.int16
    back = load_scene(folder, n_classes=20)
    for k, v in scene.items():
        np.testing.assert_array_equal(back[k], v)
    assert back["segment"].dtype == np.int64 and back["color"].dtype == np.float32


def test_save_scene_label_key_and_wide_ids(tmp_path, scene):
    big = dict(scene, instance=np.arange(len(scene["coord"])) * 1000)
    folder = save_scene(big, tmp_path / "s", label_key="segment")
    assert (folder / "segment.npy").exists() and not (folder / "segment20.npy").exists()
    assert np.load(folder / "instance.npy").dtype == np.int32  # does not fit int16
    np.testing.assert_array_equal(load_scene(folder)["instance"], big["instance"])


def test_save_scene_rejects_bad_scene(tmp_path, scene):
    with pytest.raises(MSMError, match="NaN"):
        save_scene(dict(scene, coord=np.full((64, 3), np.nan)), tmp_path / "x")


def test_pointcept_label_preference(tmp_path, scene):
    folder = save_scene(scene, tmp_path / "s")
    np.save(folder / "segment200.npy", np.full(64, 150, np.int16))
    np.testing.assert_array_equal(load_scene(folder)["segment"], scene["segment"])  # segment20 preferred
    assert (load_scene(folder, label_key="segment200")["segment"] == 150).all()
    (folder / "segment20.npy").unlink()
    assert (load_scene(folder)["segment"] == 150).all()
    with pytest.raises(MSMError, match="no label field 'segment20'"):
        load_scene(folder, label_key="segment20")


def test_pointcept_optional_files(tmp_path, scene):
    folder = save_scene(scene, tmp_path / "s")
    for name in ("normal", "segment20", "instance"):
        (folder / f"{name}.npy").unlink()
    s = load_scene(folder)
    assert set(s) == {"coord", "color", "normal"} and not s["normal"].any()  # unknown normals are zeros


def test_npz_pth_npy(tmp_path, scene):
    np.savez(tmp_path / "s.npz", **scene)
    torch.save({k: torch.from_numpy(v) for k, v in scene.items()}, tmp_path / "t.pth")
    torch.save(dict(scene, scene_id="scene0000_00"), tmp_path / "n.pth")  # Pointcept's older numpy-valued files
    rec = np.zeros(64, [("coord", "f4", 3), ("color", "u1", 3), ("normal", "f4", 3), ("segment", "i2")])
    for k in ("coord", "color", "normal", "segment"):
        rec[k] = scene[k]
    np.save(tmp_path / "r.npy", rec)
    for f in ("s.npz", "t.pth", "n.pth", "r.npy"):
        s = load_scene(tmp_path / f)
        np.testing.assert_array_equal(s["coord"], scene["coord"])
        np.testing.assert_array_equal(s["segment"], scene["segment"])


def test_pth_alternative_keys(tmp_path, scene):
    d = {"coord": scene["coord"], "color": scene["color"], "semantic_gt20": scene["segment"],
         "semantic_gt200": np.full(64, 199), "instance_gt": scene["instance"]}
    torch.save(d, tmp_path / "s.pth")
    s = load_scene(tmp_path / "s.pth")
    np.testing.assert_array_equal(s["segment"], scene["segment"])
    np.testing.assert_array_equal(s["instance"], scene["instance"])
    d["semantic_gt20"] = np.full(64, 20)
    torch.save(d, tmp_path / "s.pth")
    with pytest.raises(MSMError, match=r"\[-1, 20\)"):  # the key tells the label space
        load_scene(tmp_path / "s.pth")


@pytest.mark.parametrize("text", [False, True])
def test_ply(tmp_path, scene, text):
    s = load_scene(_write_ply(tmp_path / "s.ply", scene, text=text), n_classes=20)
    np.testing.assert_allclose(s["coord"], scene["coord"], atol=1e-6)
    np.testing.assert_allclose(s["normal"], scene["normal"], atol=1e-6)
    np.testing.assert_array_equal(s["color"], scene["color"])
    np.testing.assert_array_equal(s["segment"], scene["segment"])


def test_ply_float_colours_and_no_normals(tmp_path, scene):
    s = load_scene(_write_ply(tmp_path / "s.ply", scene, float_color=True, normals=False, label="segment"))
    np.testing.assert_allclose(s["color"], scene["color"], atol=1e-3)  # 0..1 floats -> 0..255
    assert not s["normal"].any()
    np.testing.assert_array_equal(s["segment"], scene["segment"])


# ---------------------------------------------------------------- raw S3DIS

def _s3dis_room(tmp_path, files):
    ann = tmp_path / "Area_1" / "office_1" / "Annotations"
    ann.mkdir(parents=True)
    for name, text in files.items():
        (ann / name).write_text(text)
    return ann.parent


def test_s3dis_room(tmp_path):
    room = _s3dis_room(tmp_path, {"chair_1.txt": "1 2 0.5 10 20 30\n1.1 2 0.5 10 20 30\n",
                                  "wall_2.txt": "0 0 1 200 200 200\n",
                                  "stairs_1.txt": "5 5 0.2 1 2 3\n"})
    s = load_scene(room)
    chair, wall, clutter = (S3DIS_CLASSES.index(c) for c in ("chair", "wall", "clutter"))
    np.testing.assert_array_equal(s["segment"], [chair, chair, clutter, wall])  # files in name order; stairs -> clutter
    np.testing.assert_array_equal(s["instance"], [0, 0, 1, 2])
    np.testing.assert_array_equal(s["color"][3], [200, 200, 200])


def test_s3dis_malformed_lines_are_skipped_and_counted(tmp_path):
    room = _s3dis_room(tmp_path, {"ceiling_1.txt": "1 2 3 4 5 6\n1 2 3\x10 4 5 6\n1 2 3 4 5\n1 2 3 4 5 6 7\n\n7 8 9 1 2 3\n",
                                  "table_1.txt": "1 1 0.7 9 9 9\n"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = load_scene(room)
    msgs = [str(w.message) for w in caught]
    assert any("ceiling_1.txt: skipped 3 malformed line(s)" in m for m in msgs), msgs
    assert not any("table_1.txt" in m for m in msgs)
    assert len(s["coord"]) == 3 and s["coord"][1].tolist() == [7, 8, 9]


def test_s3dis_unknown_class_is_ignored_with_warning(tmp_path):
    room = _s3dis_room(tmp_path, {"lamp_1.txt": "1 1 1 1 1 1\n", "floor_1.txt": "0 0 0 1 1 1\n"})
    with pytest.warns(UserWarning, match=r"unknown class name\(s\) \['lamp'\]"):
        s = load_scene(room)
    np.testing.assert_array_equal(s["segment"], [S3DIS_CLASSES.index("floor"), -1])


def test_s3dis_empty_annotations(tmp_path):
    (tmp_path / "room" / "Annotations").mkdir(parents=True)
    with pytest.raises(MSMError, match="no annotation files"):
        load_scene(tmp_path / "room")


# ---------------------------------------------------------------- bad inputs, one message naming the file

def _text(path, text):
    path.write_text(text)
    return path


def _broken(tmp_path, scene, **arrays):
    folder = save_scene(scene, tmp_path / "bad")
    for name, a in arrays.items():
        if a is None:
            (folder / f"{name}.npy").unlink()
        else:
            np.save(folder / f"{name}.npy", a)
    return folder


@pytest.mark.parametrize("arrays, message", [
    ({"coord": None}, "missing coord.npy"),
    ({"color": None}, "missing color.npy"),
    ({"coord": np.zeros((64, 2), np.float32)}, "'coord' has shape (64, 2), expected (N, 3)"),
    ({"color": np.zeros((63, 3), np.uint8)}, "length mismatch"),
    ({"segment20": np.zeros(65, np.int16)}, "length mismatch"),
    ({"coord": np.full((64, 3), np.inf, np.float32)}, "NaN or inf"),
    ({"coord": np.zeros((0, 3), np.float32), "color": np.zeros((0, 3), np.uint8), "normal": None,
      "segment20": None, "instance": None}, "empty scene"),
    ({"segment20": np.full(64, 20, np.int16)}, "labels must lie in [-1, 20)"),
    ({"segment20": np.full(64, -2, np.int16)}, "labels must lie in [-1, 20)"),
    ({"segment20": np.full(64, 0.5)}, "integer labels"),
])
def test_bad_pointcept_folder(tmp_path, scene, arrays, message):
    folder = _broken(tmp_path, scene, **arrays)
    with pytest.raises(MSMError) as e:
        load_scene(folder)
    assert message in str(e.value) and str(folder) in str(e.value)


def test_label_out_of_explicit_range(tmp_path, scene):
    folder = save_scene(scene, tmp_path / "s", label_key="segment")
    with pytest.raises(MSMError, match=r"\[-1, 13\)"):
        load_scene(folder, n_classes=13)


def test_corrupt_npy(tmp_path, scene):
    folder = save_scene(scene, tmp_path / "s")
    (folder / "coord.npy").write_bytes(b"not numpy")
    with pytest.raises(MSMError, match=r"coord.npy: not a readable numpy file"):
        load_scene(folder)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.ply", "no such file or folder"),
    (lambda p: _text(p / "s.xyz", "1 2 3"), "unknown scene format '.xyz'"),
    (lambda p: _text(p / "s.ply", "ply\nbroken"), "not a readable PLY file"),
    (lambda p: _text(p / "s.pth", "junk"), "not a readable torch file"),
    (lambda p: _text(p / "s.npz", "junk"), "not a readable numpy file"),
    (lambda p: torch.save([1, 2], p / "s.pth") or p / "s.pth", "expected a dict of arrays, got list"),
    (lambda p: np.save(p / "s.npy", np.array([{"coord": 1}])) or p / "s.npy", "pickled Python objects"),
    (lambda p: np.save(p / "s.npy", np.zeros((5, 6))) or p / "s.npy", "plain array of shape (5, 6)"),
    (lambda p: np.savez(p / "s.npz", coord=np.zeros((5, 3))) or p / "s.npz", "missing field 'color'"),
    (lambda p: np.savez(p / "s.npz", coord=np.zeros((5, 3)), color=np.full((5, 3), 300)) or p / "s.npz", "0..255"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "not a scene folder"),
    (lambda p: (p / "root" / "train").mkdir(parents=True) or p / "root", "this is a data root"),
])
def test_bad_files(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(MSMError) as e:
        load_scene(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_bad_ply_contents(tmp_path, scene):
    with pytest.raises(MSMError, match="missing field 'color'"):
        load_scene(_write_ply(tmp_path / "nc.ply", scene, color=False))
    p = tmp_path / "face.ply"
    PlyData([PlyElement.describe(np.zeros(2, [("a", "f4")]), "face")]).write(str(p))
    with pytest.raises(MSMError, match="no 'vertex' element"):
        load_scene(p)


# ---------------------------------------------------------------- data sets

def test_list_scenes_and_dataset(tmp_path, scene):
    for i in range(3):
        save_scene(dict(scene, coord=scene["coord"] + i), tmp_path / "train" / f"s{i}")
    np.savez(tmp_path / "train" / "z.npz", **scene)
    (tmp_path / "train" / "notes.txt").write_text("ignored")
    assert [p.name for p in list_scenes(tmp_path, "train")] == ["s0", "s1", "s2", "z.npz"]
    calls = []
    ds = SceneDataset(tmp_path, "train", transform=lambda s: calls.append(1) or dict(s, coord=s["coord"] * 0))
    assert len(ds) == 4 and ds[3]["name"] == "z" and not ds[1]["coord"].any()
    np.testing.assert_allclose(ds.load(1)["coord"], scene["coord"] + 1)  # the cache keeps untransformed arrays
    assert len(calls) == 2
    loader = torch.utils.data.DataLoader(SceneDataset(tmp_path, "train"), batch_size=None, num_workers=0)
    assert [b["name"] for b in loader] == ["s0", "s1", "s2", "z"]


def test_dataset_without_cache_rereads(tmp_path, scene):
    save_scene(scene, tmp_path / "val" / "a")
    ds = SceneDataset(tmp_path, "val", cache=False)
    ds[0]
    np.save(tmp_path / "val" / "a" / "coord.npy", scene["coord"] + 5)
    np.testing.assert_allclose(ds[0]["coord"], scene["coord"] + 5)


def test_list_scenes_errors(tmp_path):
    with pytest.raises(MSMError, match="data root not found"):
        list_scenes(tmp_path / "nope", "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(MSMError, match=r"no 'val' split folder \(found: train\)"):
        list_scenes(tmp_path, "val")
    with pytest.raises(MSMError, match="no scenes"):
        list_scenes(tmp_path, "train")


# ---------------------------------------------------------------- synthetic rooms

@pytest.fixture(scope="module")
def rooms():
    return [synthetic_room(s, n_points=8000) for s in range(4)]


def test_synthetic_deterministic():
    a, b = synthetic_room(7, n_points=5000), synthetic_room(7, n_points=5000)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = synthetic_room(8, n_points=5000)
    assert not np.array_equal(a["coord"], c["coord"])


def test_synthetic_invariants(rooms):
    for r in rooms:
        n = len(r["coord"])
        assert n == 8000
        assert r["coord"].dtype == np.float32 and r["color"].dtype == np.float32 and r["normal"].dtype == np.float32
        assert r["segment"].dtype == np.int64 and r["instance"].dtype == np.int64
        np.testing.assert_allclose(np.linalg.norm(r["normal"], axis=1), 1, atol=1e-5)
        assert r["color"].min() >= 0 and r["color"].max() <= 255 and (r["color"] == np.round(r["color"])).all()
        assert r["segment"].min() >= -1 and r["segment"].max() < len(SCANNET20_CLASSES)
        assert abs(float(r["coord"][:, 2].min())) < 0.03 and r["coord"][:, :2].min() > -0.03  # floor at z = 0
        present = set(r["segment"].tolist()) - {-1}
        assert {SCANNET20_CLASSES.index("wall"), SCANNET20_CLASSES.index("floor")} <= present and len(present) >= 5
        for i in np.unique(r["instance"][r["instance"] >= 0]):  # an instance has one label
            assert len(np.unique(r["segment"][r["instance"] == i])) == 1
        floor = r["segment"] == SCANNET20_CLASSES.index("floor")
        assert (r["normal"][floor, 2] > 0.99).all()  # floor normals point up, into the room


def test_synthetic_hard_colours(rooms):
    "One palette: no class has a colour of its own (furniture classes overlap in mean colour)."
    seg = np.concatenate([r["segment"] for r in rooms])
    col = np.concatenate([r["color"] for r in rooms])
    means = {c: col[seg == c].mean(0) for c in np.unique(seg) if c >= 0 and (seg == c).sum() > 200}
    spread = np.std([m for m in means.values()], axis=0).mean()
    within = np.mean([col[seg == c].std(0).mean() for c in means])
    assert spread < within  # class means differ less than colours within a class


def test_synthetic_options():
    r = synthetic_room(3, n_points=4000, ceiling=True, rotate=False, props=False)
    assert len(r["coord"]) == 4000
    wall = r["segment"] == SCANNET20_CLASSES.index("wall")
    assert (np.abs(r["normal"][wall]).max(1) > 0.999).all()  # not rotated: wall normals along x or y
    only = synthetic_room(3, n_points=4000, room_types=("bedroom",))
    assert (only["segment"] == SCANNET20_CLASSES.index("bed")).any()
    with pytest.raises(MSMError, match="unknown RoomConfig field"):
        synthetic_room(0, n_point=10)
    with pytest.raises(MSMError, match="unknown room type"):
        synthetic_room(0, room_types=("garage",))


def test_make_samples(tmp_path):
    folders = make_samples(tmp_path, n_train=2, n_val=1, seed=3, n_points=2000)
    assert [f"{f.parent.name}/{f.name}" for f in folders] == ["train/room_0000", "train/room_0001", "val/room_0002"]
    assert np.load(folders[0] / "segment20.npy").dtype == np.int16
    again = make_samples(tmp_path / "b", n_train=1, n_val=0, seed=3, n_points=2000)
    np.testing.assert_array_equal(load_scene(again[0])["coord"], load_scene(folders[0])["coord"])
    with pytest.raises(MSMError, match="positive number of rooms"):
        make_samples(tmp_path, n_train=0, n_val=0)


# ---------------------------------------------------------------- the committed samples

def test_data_samples():
    train, val = SceneDataset(SAMPLES, "train", n_classes=20), SceneDataset(SAMPLES, "val", n_classes=20)
    assert len(train) == 8 and len(val) == 4
    total = sum(f.stat().st_size for f in SAMPLES.rglob("*") if f.is_file())
    assert total <= 8 * 2**20  # 5.5 MiB of rooms + 1.8 MiB of stand-in feat2d.npy (train rooms, 8 channels)
    seg = np.concatenate([d[i]["segment"] for d in (train, val) for i in range(len(d))])
    assert len(set(seg.tolist()) - {-1}) >= 12
    # data_samples/README.md's command reproduces the rooms (compared by class histogram: the exact points may move
    # with floating-point details of other platforms)
    again = synthetic_room(int(np.random.SeedSequence([0, 8]).generate_state(1)[0]), n_points=len(val[0]["segment"]),
                           room_types=("kitchen",))  # room types take turns: room 8 is the fourth type
    h0, h1 = (np.bincount(s + 1, minlength=21) / len(s) for s in (val[0]["segment"], again["segment"]))
    assert np.abs(h0 - h1).max() < 0.02
