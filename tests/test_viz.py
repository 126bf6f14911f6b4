"Visualisation (msm.viz): PCA colours, palettes, PNG panels, interactive HTML (and a real headless-browser check)."
import base64
import json
import os
import re
import subprocess

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from msm.core import MSMError
from msm.data import synthetic_room
from msm.masking import patch_mask
from msm.viz import (
    label_colors,
    mask_colors,
    pca_colors,
    plot_mask_levels,
    plot_panels,
    plot_points,
    render_scene_features,
    scene_html,
)
from msm.voxelize import collate, voxelize_scene

CHROMIUM = "/usr/bin/chromium"


def _clusters(n=3000, seed=0, outliers=0, dim=64):
    "3 clusters in `dim`-D along one dominant direction u (centres -6, 0, 6), small offsets along v."
    g = torch.Generator().manual_seed(seed)
    u, v = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))[0].T
    label = torch.arange(n) % 3
    x = (label - 1).double()[:, None] * 6 * u + (label == 1).double()[:, None] * 2 * v
    x = x + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    if outliers:
        x[:outliers] += 1e4 * u
    return x, label.numpy()


def _html_payload(path):
    "The figure JSON embedded in a plotly HTML file (the first argument list of Plotly.newPlot)."
    text = open(path).read()
    xs = [len(base64.b64decode(json.loads(f'"{s}"'))) // 4
          for s in re.findall(r'"x":\{"dtype":"f4","bdata":"([^"]*)"\}', text)]
    labels = re.findall(r'"label":"([^"]*)","method":"restyle"', text)
    return text, xs, labels


@pytest.fixture(scope="module")
def room():
    return synthetic_room(2, n_points=20_000)


def test_first_component_separates_clusters():
    x, lab = _clusters()
    rgb, basis = pca_colors(x)
    assert rgb.shape == (3000, 3) and rgb.dtype == np.float32 and rgb.min() >= 0 and rgb.max() <= 1
    red = np.array([rgb[lab == c, 0].mean() for c in range(3)])
    assert np.all(np.diff(red) > 0.2) or np.all(np.diff(red) < -0.2), red  # ordered and well apart
    assert max(rgb[lab == c, 0].std() for c in range(3)) < 0.05
    assert basis.explained[0] > 0.5 and basis.components.shape == (64, 3)
    # numpy and torch inputs, row order: same colours
    perm = np.random.default_rng(0).permutation(3000)
    np.testing.assert_allclose(pca_colors(x.numpy()[perm])[0], rgb[perm], atol=1e-3)  # float32 covariance
    # pca through the subsample path (fit on 1000 points) still separates the clusters
    rgb_sub = pca_colors(x, fit_points=1000)[0]
    red_sub = np.array([rgb_sub[lab == c, 0].mean() for c in range(3)])
    assert np.all(np.abs(np.diff(red_sub)) > 0.2)


def test_shared_basis_gives_identical_colours():
    x, _ = _clusters(seed=0)
    y, _ = _clusters(seed=1)
    rgb_x, basis = pca_colors(x)
    scene2 = torch.cat([y[:700], x[100:400], y[700:900]])
    rgb2, basis2 = pca_colors(scene2, basis=basis)
    assert basis2 is basis
    np.testing.assert_array_equal(rgb2[700:1000], rgb_x[100:400])
    with pytest.raises(MSMError, match="fitted on 64"):
        pca_colors(x[:, :32], basis=basis)


def test_robust_range_ignores_outliers():
    x, lab = _clusters(outliers=5)
    rob = pca_colors(x)[0][5:]
    plain = pca_colors(x, robust=False)[0][5:]
    lab = lab[5:]
    gap = lambda c: np.ptp([c[lab == k, 0].mean() for k in range(3)])
    assert gap(rob) > 0.5 and gap(plain) < 0.01
    k_small = pca_colors(x, k_mad=0.5)[0][5:]  # a narrower inlier band saturates more points
    assert (k_small[:, 0] <= 0).mean() + (k_small[:, 0] >= 1).mean() > (rob[:, 0] <= 0).mean() + (rob[:, 0] >= 1).mean()


def test_remove_first_and_degenerate_inputs():
    x, _ = _clusters()
    h = torch.linspace(0, 1, len(x), dtype=torch.float64)
    x2 = torch.cat([100 * h[:, None], x], 1)  # a dominant first channel
    _, b1 = pca_colors(x2)
    _, b2 = pca_colors(x2, remove_first=True)
    assert abs(b1.components[0, 0]) > 0.99 and abs(b2.components[0, 0]) < 0.05
    rgb = pca_colors(torch.ones(50, 8))[0]  # constant features: mid grey, no NaN
    np.testing.assert_allclose(rgb, 0.5)
    rgb = pca_colors(np.random.default_rng(0).normal(size=(40, 2)))[0]  # fewer channels than components
    assert np.isfinite(rgb).all() and np.allclose(rgb[:, 2], 0.5)
    grey = pca_colors(x, n_components=1)[0]
    assert np.allclose(grey[:, 0], grey[:, 1]) and np.allclose(grey[:, 0], grey[:, 2])
    for bad, msg in [(torch.zeros(0, 4), "non-empty"), (torch.zeros(5), "non-empty"),
                     (torch.tensor([[1.0, float("inf")]]), "NaN or inf")]:
        with pytest.raises(MSMError, match=msg):
            pca_colors(bad)
    with pytest.raises(MSMError, match="n_components"):
        pca_colors(x, n_components=4)


def test_label_palette():
    c = label_colors(np.array([-1, 0, 1, 19, 0]))
    assert np.allclose(c[0], 0.6) and np.array_equal(c[1], c[4]) and not np.array_equal(c[1], c[2])
    assert len({tuple(v) for v in label_colors(np.arange(20))}) == 20  # 20 distinct class colours
    assert len({tuple(v) for v in label_colors(np.arange(200), 200)}) == 200
    assert np.array_equal(label_colors(torch.tensor([3])), label_colors(np.array([3])))
    with pytest.raises(MSMError, match="out of range"):
        label_colors(np.array([20]))
    with pytest.raises(MSMError, match="integers"):
        label_colors(np.array([0.5]))


def test_png_written_and_not_blank(room, tmp_path):
    cols = {"RGB": room["color"], "labels": label_colors(room["segment"]), "PCA": pca_colors(room["coord"] ** 2)[0]}
    out = plot_panels(room["coord"], cols, views=("top", "oblique", "side"), out=tmp_path / "a" / "p.png", dpi=50)
    img = mpimg.imread(out)
    assert img.shape[0] > 100 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # a blank (white) picture has std 0
    blank = plot_panels(room["coord"], {"": np.ones_like(room["color"])}, out=tmp_path / "w.png", dpi=50)
    assert mpimg.imread(blank)[..., :3].std() < 0.01  # the check above can fail
    ax = plot_points(room["coord"], room["color"], view="side", max_points=1000)
    assert len(ax.collections[0].get_offsets()) == 1000
    with pytest.raises(MSMError, match="view must be one of"):
        plot_panels(room["coord"], cols, views=("front",))
    with pytest.raises(MSMError, match="colours must be"):
        plot_panels(room["coord"], {"RGB": room["color"][:10]})


def test_mask_pictures(room, tmp_path):
    vox = collate([voxelize_scene(room, 0.04, "train", torch.Generator().manual_seed(0))])
    m = patch_mask(vox["coords"], 8, 0.4, torch.Generator().manual_seed(0))
    rgb = (vox["feats"][:, :3] + 1) / 2
    tinted = mask_colors(rgb, m)
    assert np.allclose(tinted[~m.numpy()], rgb[~m].numpy()) and not np.allclose(tinted[m.numpy()], rgb[m].numpy())
    out = plot_mask_levels(vox["coords"], rgb, m, 4, voxel_size=0.04, out=tmp_path / "levels.png", dpi=40)
    assert mpimg.imread(out)[..., :3].std() > 0.05
    with pytest.raises(MSMError, match="no voxel of scene 3"):
        plot_mask_levels(vox["coords"], rgb, m, 4, scene=3)


def test_html_point_budget_and_colourings(tmp_path):
    rng = np.random.default_rng(0)
    coord = rng.normal(size=(200_000, 3)).astype(np.float32)
    cols = {"RGB": rng.random((200_000, 3)), "labels": label_colors(rng.integers(-1, 20, 200_000)),
            "PCA": rng.random((200_000, 3))}
    f = scene_html(coord, cols, tmp_path / "s.html", max_points=100_000, title="big")
    text, xs, labels = _html_payload(f)
    assert xs == [100_000] and labels == ["RGB", "labels", "PCA"]
    assert "<html" in text and "plotly" in text.lower() and '"aspectmode":"data"' in text
    # each button carries one colour per shown point
    first_button = re.search(r'"args":\[\{"marker.color":\[\[("#[0-9a-f]{6}",?)+\]\]\}\]', text)
    assert first_button is not None and first_button.group(0).count("#") == 100_000
    # seeded subsampling: the same file twice; smaller scenes keep every point
    small = {k: v[:20_000] for k, v in cols.items()}
    a = scene_html(coord[:20_000], small, tmp_path / "a.html", max_points=5000).read_text()
    assert a == scene_html(coord[:20_000], small, tmp_path / "b.html", max_points=5000).read_text()
    assert a != scene_html(coord[:20_000], small, tmp_path / "c.html", max_points=5000, seed=1).read_text()
    _, xs, labels = _html_payload(scene_html(coord[:500], cols["RGB"][:500], tmp_path / "small.html"))
    assert xs == [500] and labels == []


def test_render_scene_features(room, tmp_path):
    from msm.data import save_scene

    folder = save_scene(room, tmp_path / "room")
    feats = lambda model, s: np.c_[np.sin(3 * s["coord"]), np.cos(2 * s["coord"])]
    files = render_scene_features(None, folder, tmp_path / "viz", features_fn=feats, max_points=5000)
    assert [p.name for p in files] == ["features.png", "features.html", "pca_colors.txt"]
    assert mpimg.imread(files[0])[..., :3].std() > 0.05
    assert _html_payload(files[1])[1] == [5000]
    txt = np.loadtxt(files[2])
    assert txt.shape == (len(room["coord"]), 6) and txt[:, 3:].min() >= 0 and txt[:, 3:].max() <= 1
    with pytest.raises(MSMError, match="feature rows"):
        render_scene_features(None, room, tmp_path / "bad", features_fn=lambda m, s: np.zeros((5, 4)))


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_html_in_chromium(room, tmp_path):
    "Open the standalone HTML in headless Chromium: the plot renders (WebGL canvas) with its menu, and pixels appear."
    cols = {"RGB": room["color"], "labels": label_colors(room["segment"])}
    f = scene_html(room["coord"], cols, tmp_path / "room.html", max_points=10_000, title="room")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
             "--disable-background-networking", "--virtual-time-budget=4000", "--window-size=800,600"]
    url = f.resolve().as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'class="plotly-graph-div js-plotly-plot"' in dom and "plot-container plotly" in dom
    assert "<canvas" in dom  # the WebGL scene was created
    assert dom.count('class="updatemenu-button"') == 2  # the RGB / labels menu
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120, cwd=tmp_path)
    img = mpimg.imread(shot)[..., :3]
    coloured = (np.abs(img - img.mean(-1, keepdims=True)).max(-1) > 0.08).mean()  # saturated (non-grey) pixels
    assert img.std() > 0.05 and coloured > 0.002, (img.std(), coloured)
    print(f"\nchromium: {coloured:.1%} coloured pixels in the screenshot")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pca_on_cuda_matches_cpu():
    x, _ = _clusters()
    rgb_cpu, basis = pca_colors(x)
    rgb_gpu, _ = pca_colors(x.cuda())
    np.testing.assert_allclose(rgb_gpu, rgb_cpu, atol=1e-4)
    np.testing.assert_allclose(pca_colors(x.cuda(), basis=basis)[0], rgb_cpu, atol=1e-5)


def test_cli_viz_end_to_end(tmp_path):
    "`msm viz` on a sample room with a randomly initialised tiny HUNet checkpoint: PNG, HTML and text file."
    pytest.importorskip("msm.hunet")
    pytest.importorskip("msm.probe")
    from pathlib import Path

    from msm.cli import main
    from msm.hunet import HUNet, HUNetConfig

    torch.manual_seed(0)
    model = HUNet(HUNetConfig.tiny())
    ckpt = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "config": {"model": model.config.to_dict()}}, ckpt)
    room = sorted((Path(__file__).parents[1] / "data_samples" / "val").iterdir())[0]
    assert main(["viz", "--ckpt", str(ckpt), "--scene", str(room), "--out", str(tmp_path / "viz")]) == 0
    png, html, txt = (tmp_path / "viz" / n for n in ("features.png", "features.html", "pca_colors.txt"))
    assert mpimg.imread(png)[..., :3].std() > 0.05
    assert _html_payload(html)[2] == ["RGB", "labels", "PCA"]
    assert np.loadtxt(txt, max_rows=3).shape == (3, 6)
    assert main(["viz", "--ckpt", str(ckpt), "--scene", str(tmp_path / "nope"), "--out", str(tmp_path / "v2")]) == 2
