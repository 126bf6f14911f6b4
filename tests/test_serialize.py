"""Curve codes against the official implementation (used as a test oracle, never copied) and window attention
against a full-softmax reference on many random scenes."""
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from msm.core import MSMError
from msm.serialize import CURVES, curve_codes, hilbert_encode, serialize, window_attention, z_order_encode

OFFICIAL = Path(os.environ.get("MSM_OFFICIAL_SRC", "/tmp/msm-official-src/inference")) / "model" / "serialization"


@pytest.fixture(scope="module")
def official():
    "The official `serialization` package, imported from its folder (skipped when absent)."
    if not (OFFICIAL / "__init__.py").exists():
        pytest.skip(f"official serialization source not found at {OFFICIAL} (set MSM_OFFICIAL_SRC)")
    spec = importlib.util.spec_from_file_location("_official_serialization", OFFICIAL / "__init__.py",
                                                  submodule_search_locations=[str(OFFICIAL)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("hi", [2, 37, 1000, 2**16])
def test_codes_equal_official(official, hi):
    g = torch.Generator().manual_seed(hi)
    xyz = torch.randint(0, hi, (20000, 3), generator=g)
    b = torch.randint(0, 5, (20000,), generator=g)
    test = {"z": z_order_encode, "hilbert": hilbert_encode}
    for order, fn in test.items():
        assert torch.equal(official.encode(xyz, batch=b, depth=16, order=order), fn(xyz) | (b << 48))
    coords = torch.cat([b[:, None], xyz], 1)
    # the official SpaceFillingCurves module: 'yxz' = columns [2, 1, 3] of [b, x, y, z]
    for curve in CURVES:
        ids = coords[:, 1:] if curve.startswith("xyz") else coords[:, [2, 1, 3]]
        ref = official.encode(ids, batch=b, depth=16, order="z" if curve.endswith("z-order") else "hilbert")
        assert torch.equal(curve_codes(coords, curve), ref), curve


def test_serialize_sorts(official):
    g = torch.Generator().manual_seed(0)
    coords = torch.unique(torch.cat([torch.randint(0, 3, (5000, 1), generator=g),
                                     torch.randint(0, 300, (5000, 3), generator=g)], 1), dim=0)
    coords = coords[torch.randperm(len(coords), generator=g)]
    for curve in CURVES:
        order, inverse = serialize(coords, curve)
        codes = curve_codes(coords, curve)
        assert torch.equal(order, torch.argsort(codes))
        assert torch.equal(inverse[order], torch.arange(len(coords)))


def _naive(q, k, v, batch, window):
    M = len(q)
    i, j = torch.arange(M)[:, None], torch.arange(M)[None]
    allowed = ((i - j).abs() <= window // 2) & (batch[:, None] == batch[None])
    s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hij,jhd->ihd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("seed", range(12))
def test_window_attention_random_scenes(seed):
    g = torch.Generator().manual_seed(seed)
    n_scenes = int(torch.randint(1, 6, (1,), generator=g))
    sizes = torch.randint(1, 300, (n_scenes,), generator=g)
    window = int(torch.randint(0, 700, (1,), generator=g))
    H, D = int(torch.randint(1, 5, (1,), generator=g)), 8
    batch = torch.repeat_interleave(torch.arange(n_scenes) * 2, sizes)  # ids need not be consecutive
    M = len(batch)
    q, k, v = (torch.randn(M, H, D, generator=g) for _ in range(3))
    ref = _naive(q, k, v, batch, window)
    for block in (None, 1, 17, 1000):
        out = window_attention(q, k, v, batch, window, block=block)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (block, (out - ref).abs().max())


def test_window_attention_grad_and_errors():
    q, k, v = (torch.randn(30, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor([4, 16, 10]))
    assert torch.autograd.gradcheck(lambda a, b, c: window_attention(a, b, c, batch, 6, block=8), (q, k, v))
    with pytest.raises(MSMError, match="shape"):
        window_attention(q, k[:10], v, batch, 12)
    with pytest.raises(MSMError, match="one scene id per token"):
        window_attention(q, k, v, batch[:5], 12)


def test_negative_coords_shifted():
    c = torch.tensor([[0, -5, 0, 0], [0, 3, 2, 1], [0, -1, 7, 2]])
    shifted = c.clone()
    shifted[:, 1:] -= c[:, 1:].min(0).values
    for curve in CURVES:
        assert torch.equal(curve_codes(c, curve), curve_codes(shifted, curve))
