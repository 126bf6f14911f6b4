"""Host stalls of one pre-training step: how many ATen ops a `paper`-preset masked-scene-modeling step dispatches and
how many of them must bring a shape or a value back to the host (a GPU stream stalls on each), with the Python line of
the library that asked for each, plus the step time and the DataLoader worker's time to prepare one sample.

The step is what `msm pretrain` runs per batch minus the optimiser: the model's forward on a batch (student forward
on the masked view, teacher forward on the other view, per-level matched loss) and the backward of the loss. The
batch is one ScanNet-size scene (a synthetic room of `--points` points, default 150 000, made by
`msm.data.synthetic_room`) through the normal pre-training path: the preset's sampler (`PairSampler`: crop, two
views, voxelisation, mask, matches, and whatever the sampler prepares for the network) and `collate_pairs`, which
DataLoader workers run. CPU by default, CUDA with `--device cuda`.

Counting: `HostSyncCounter`, a `TorchDispatchMode`, sees every ATen op dispatched inside the step (the backward
included) and classes as a host sync every op whose output shape or value the host must read: `_local_scalar_dense`
(`.item()`, `bool()`, `int()`, `float()` of a tensor), `.tolist()` (counted by a wrapper: on CPU it dispatches
nothing), `equal`, `is_nonzero`, `nonzero`, `argwhere`, `unique*`, `masked_select`, `index` / `index_put_` with a
boolean index, `bincount`, `repeat_interleave` without `output_size`, and copies of device tensors to the host. Each is
charged to the first stack frame inside the `msm` package (file:line), or `<autograd>` for built-in backward ops.

Times: `step_s` is the median of `--repeats` timed steps after `--warmup` warm-up steps (no counter attached);
`sample_s` is the DataLoader worker's time for one scene (BLAS / OpenMP threads pinned to 1 as in a worker): the median
of the sampler (`sampler_s`) plus `collate_pairs` on it (`collate_s`, where the maps of the step are prepared). Every
step gets a fresh copy of the batch, pickled and unpickled as a DataLoader hands it over, so nothing that one step
builds and caches is reused by the next.

    python benchmarks/bench_step.py [--preset paper|ablation|tiny] [--points 150000] [--repeats 3] [--warmup 1]
                                    [--threads 2] [--device cpu|cuda] [--top 15] [--no-time]

The default run takes a few minutes on 2 CPU cores; `--preset tiny --points 20000` is a quick check. Last line: one
JSON object with `syncs_per_step`, `ops_per_step`, `step_s`, `sample_s` and more.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on a shared machine

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

_MSM_DIR = os.sep + "msm" + os.sep
_SYNC_NAMES = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "argwhere", "masked_select", "bincount",
               "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
               "histc"}


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def is_host_sync(func, args, kwargs) -> bool:
    "True when the ATen op `func` (an OpOverload) on these arguments must bring a shape or value back to the host."
    name = func.overloadpacket.__name__
    if name in _SYNC_NAMES:
        return True
    if name in ("index", "_index_put_impl_", "index_put", "index_put_", "_unsafe_index"):
        return _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and not (len(args) > 3 and args[3] is not None)
    if name in ("_to_copy", "copy_", "_copy_from"):  # device -> host copies
        src = args[0] if name != "copy_" else args[1]
        dst_dev = kwargs.get("device") if name == "_to_copy" else (args[1].device if name == "_copy_from"
                                                                      else args[0].device)
        return isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and \
            dst_dev is not None and torch.device(dst_dev).type == "cpu"
    return False


def call_site(skip_dirs=(os.sep + "torch" + os.sep,)) -> str:
    "file:line of the innermost stack frame inside the msm package, '<autograd>' when none (built-in backward ops)."
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if _MSM_DIR in fn:
            return f"{fn[fn.rindex(_MSM_DIR) + 1:]}:{f.f_lineno}"
        f = f.f_back
    return "<autograd>"


class HostSyncCounter(TorchDispatchMode):
    """Count every ATen op dispatched inside the block and the host syncs among them (`is_host_sync`), by call site.

    `ops` and `syncs` are Counters {site: count} (also `sync_ops` {op name: count}); `.tolist()` is wrapped while the
    mode is active (it dispatches nothing on CPU). Usable from tests: `with HostSyncCounter() as c: step()`."""

    def __init__(self, sites: bool = True):
        super().__init__()
        self.sites = sites
        self.ops, self.syncs, self.sync_ops = collections.Counter(), collections.Counter(), collections.Counter()

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    def _count_sync(self, name: str, site: str):
        self.syncs[site] += 1
        self.sync_ops[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        site = call_site() if self.sites else "-"
        self.ops[site] += 1
        if is_host_sync(func, args, kwargs):
            self._count_sync(func.overloadpacket.__name__, site)
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter, orig = self, self._tolist

        def tolist(t):
            counter._count_sync("tolist", call_site() if counter.sites else "-")
            return orig(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def make_batch(cfg, points: int, seed: int = 0):
    "(batch, sample seconds, collate seconds): one synthetic room through the preset's sampler and collate."
    import numpy as np

    from msm.data import synthetic_room
    from msm.pretrain import MSM

    scene = synthetic_room(seed, n_points=points)
    sampler = MSM.build_sampler(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's BLAS / OpenMP threads
    try:
        times = []
        for r in range(3):
            t0 = time.perf_counter()
            sample = sampler(scene, np.random.default_rng(seed + r), 0, 1000)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batch = MSM.collate([sample])
        collate_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return batch, statistics.median(times), collate_s, len(scene["coord"])


def fresh(batch):
    "A copy of the batch as a DataLoader hands it over (pickled, unpickled): nothing a previous step cached survives."
    return pickle.loads(pickle.dumps(batch))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", choices=("tiny", "ablation", "paper"))
    p.add_argument("--points", type=int, default=150_000, help="points of the synthetic room (ScanNet: ~150k)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=15, help="rows of the table of call sites")
    p.add_argument("--no-time", action="store_true", help="count only (no timed steps)")
    args = p.parse_args(argv)

    from msm.core import to_device
    from msm.pretrain import MSM, PretrainConfig

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = PretrainConfig.preset(args.preset).replace(batch_size=1)
    batch, sample_s, collate_s, n_points = make_batch(cfg, args.points)
    torch.manual_seed(0)
    model = MSM.build_model(cfg).to(dev).train()

    def step(b):
        model.zero_grad(set_to_none=True)
        res = model(b)
        res["loss"].backward()
        return res

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step(to_device(fresh(batch), dev))  # first step: lazy inits are not what a training step costs
    sync()
    b = to_device(fresh(batch), dev)
    with HostSyncCounter() as c:
        step(b)
        sync()
    times = []
    if not args.no_time:
        for r in range(args.warmup + args.repeats):
            b = to_device(fresh(batch), dev)
            sync()
            t0 = time.perf_counter()
            step(b)
            sync()
            if r >= args.warmup:
                times.append(time.perf_counter() - t0)
    step_s = statistics.median(times) if times else float("nan")

    n_vox = len(batch["student_coords"]), len(batch["teacher_coords"])
    batch_mb = len(pickle.dumps(batch)) / 2**20  # what a worker hands over (with the plan, if any)
    print(f"preset {args.preset}, {n_points} points, voxels student {n_vox[0]} / teacher {n_vox[1]}, "
          f"device {dev}, {args.threads} threads")
    print(f"{'call site':<44} {'syncs':>7} {'ops':>8}")
    for site, n in c.syncs.most_common(args.top):
        print(f"{site:<44} {n:>7} {c.ops[site]:>8}")
    print(f"{'(all sites)':<44} {c.n_syncs:>7} {c.n_ops:>8}")
    print("sync ops:", ", ".join(f"{k} {v}" for k, v in c.sync_ops.most_common()))
    print("busiest sites by ops:", ", ".join(f"{k} {v}" for k, v in c.ops.most_common(5)))
    print(f"step {step_s:.3f} s (median of {len(times)}); worker per sample {sample_s + collate_s:.3f} s "
          f"(sampler {sample_s:.3f} s + collate {collate_s:.3f} s), batch {batch_mb:.1f} MiB pickled")
    print(json.dumps({"preset": args.preset, "device": str(dev), "points": n_points, "student_voxels": n_vox[0],
                      "teacher_voxels": n_vox[1], "syncs_per_step": c.n_syncs, "ops_per_step": c.n_ops,
                      "step_s": round(step_s, 4), "sample_s": round(sample_s + collate_s, 4),
                      "sampler_s": round(sample_s, 4), "collate_s": round(collate_s, 4),
                      "batch_mib": round(batch_mb, 1),
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
