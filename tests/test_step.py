"""The training step without host stalls (issue 19): what the DataLoader worker prepares (`StepPlan`: maps, plans,
curve orders, masked view, loss rows) gives the same loss and gradients as the maps built on the fly, survives the
trip through pickle and `to_device`, and leaves no data-dependent op in the step (counted by the benchmark's
`HostSyncCounter`)."""

import importlib.util
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from msm.core import to_device
from msm.data import synthetic_room
from msm.pretrain import MSM, PretrainConfig

_spec = importlib.util.spec_from_file_location("bench_step", Path(__file__).parents[1] / "benchmarks" / "bench_step.py")
bench_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_step)


def _setup(visible_weight=0.0, att_drop=0.1, ratio=None, symmetric=False):
    cfg = PretrainConfig.preset("tiny").replace(crop_points=6000)
    cfg = cfg.replace(model=replace(cfg.model, att_drop=att_drop),
                      objective=replace(cfg.objective, visible_weight=visible_weight, symmetric=symmetric))
    if ratio is not None:
        cfg = cfg.replace(mask=replace(cfg.mask, ratio=ratio))
    sampler = MSM.build_sampler(cfg)
    samples = [sampler(synthetic_room(s, n_points=8000), np.random.default_rng(s), 0, 100) for s in (0, 1)]
    batch = MSM.collate(samples)
    torch.manual_seed(0)
    model = MSM.build_model(cfg).train()
    return model, batch


def _step(model, batch):
    torch.manual_seed(1)  # drop path and attention dropout draw the same numbers in both runs
    model.zero_grad(set_to_none=True)
    res = model(batch)
    res["loss"].backward()
    return res, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", [dict(visible_weight=0.0), dict(visible_weight=0.5), dict(ratio=0.0),
                                  dict(symmetric=True)])
def test_prepared_step_equals_on_the_fly(case):
    model, batch = _setup(**case)
    assert (batch["mask"] is None) == (case.get("ratio") == 0.0)
    assert "plan" in batch and "curve_perms" in batch
    bare = {k: v for k, v in batch.items() if k != "plan"}  # same batch and curve draws, maps built in the step
    prepared = pickle.loads(pickle.dumps(batch))  # as a DataLoader hands it over
    with bench_step.HostSyncCounter(sites=False) as c:
        res_p, g_p = _step(model, prepared)
    assert c.n_syncs == 0, dict(c.sync_ops)
    res_b, g_b = _step(model, bare)
    # identical maps, plans and orders on the same device -> the same operations in the same order: bitwise equal
    assert sorted(g_p) == sorted(g_b) and len(g_p) > 0
    for k in res_b:
        assert torch.equal(torch.as_tensor(res_p[k]), torch.as_tensor(res_b[k])), k
    for n in g_b:
        assert torch.equal(g_p[n], g_b[n]), n


def test_prepared_step_has_no_host_sync():
    model, batch = _setup()
    batch = to_device(pickle.loads(pickle.dumps(batch)), torch.device("cpu"))  # as a DataLoader hands it over
    with bench_step.HostSyncCounter() as c:
        _step(model, batch)
    assert c.n_syncs == 0, dict(c.syncs)
    assert c.n_ops > 0
    with bench_step.HostSyncCounter() as c:  # the same step on a bare batch builds its maps: the counter sees it
        _step(model, {k: v for k, v in batch.items() if k != "plan"})
    assert c.n_syncs > 0 and c.sync_ops["nonzero"] > 0


def test_counter_classes_ops():
    x = torch.tensor([0, 3, 0, 5])
    with bench_step.HostSyncCounter() as c:
        x.nonzero(), x[x > 0], int(x.sum()), x.tolist(), torch.unique(x)
        torch.repeat_interleave(x, x, output_size=8), x.index_select(0, x[:2])
    assert dict(c.sync_ops) == {"nonzero": 1, "index": 1, "_local_scalar_dense": 1, "tolist": 1, "_unique2": 1}
    assert c.n_ops >= 7
    assert torch.Tensor.tolist is not None and x.tolist() == [0, 3, 0, 5]  # wrapper removed on exit
