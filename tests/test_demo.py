"The end-to-end demo with a reduced budget: report, figures, interactive view, results table."
import json

import pytest

from msm.core import MSMError
from msm.demo import DemoConfig, run_demo


def test_demo_end_to_end_small(tmp_path):
    cfg = DemoConfig(max_steps=4, probe_epochs=2, knn_max_per_class=200, html_points=5000)
    report = run_demo(tmp_path / "demo", config=cfg, progress=False)
    text = report.read_text()
    assert "| MSM pre-trained |" in text and "| random init |" in text
    for f in ("loss.png", "features.png", "features.html", "results.json", "pretrain/checkpoint.pt"):
        assert (tmp_path / "demo" / f).is_file(), f
    assert (tmp_path / "demo" / "features.png").stat().st_size > 10_000
    html = (tmp_path / "demo" / "features.html").read_text()
    assert "plotly" in html.lower()
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    for name in ("MSM pre-trained", "random init"):
        for mode in ("linear", "knn"):
            assert 0.0 <= res["rows"][name][mode]["miou"] <= 1.0


def test_demo_bad_data_root(tmp_path):
    with pytest.raises(MSMError, match="not found|no such|missing"):
        run_demo(tmp_path / "out", data_root=tmp_path / "nowhere", config=DemoConfig(max_steps=1))
