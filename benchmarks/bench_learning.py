"""The learning benchmark (issues #6 and #8): does pre-training learn something a random network does not?

Each row obtains a frozen `tiny` HUNet in its own way -- random init, masked scene modeling (MSM), a supervised
HUNet trained end to end on the same labels (the ceiling), MSM with one Table 10 switch flipped (no masking, loss on
the last level only, top-down masking), and the baselines of msm.baselines (input reconstruction, masked scene
contrast, masked token prediction, 2D feature distillation) -- for the same number of steps on the same synthetic
rooms, then probes it (linear and kNN, mIoU on all points of the validation rooms). Several seeds per row; the table
gives mean [min-max] and the wall time of one run. Results are cached per run under --out, so an interrupted
benchmark continues where it stopped and rows can be added later.

    python benchmarks/bench_learning.py                               # random, MSM, supervised; 3 seeds (README table)
    python benchmarks/bench_learning.py --rows all --jobs 2           # every row
    python benchmarks/bench_learning.py --rows random,msm --seeds 0 --steps 100   # a quick look
    python benchmarks/bench_learning.py --rows random,msm --data-seed 1 --out fresh   # other rooms
    python benchmarks/bench_learning.py --rows random,msm --data-seed 2 --n-train 16 --out more   # twice the rooms
    python benchmarks/bench_learning.py --rows random,msm,supervised,labels,instance   # limited labels, instances

The rooms are generated once into --data (default <out>/rooms). Last line: one JSON object with the MSM - random gap.
See nbs/14_learning.ipynb for what each row is.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from msm.learning import (  # noqa: E402
    ROW_GROUPS,
    ROWS,
    BenchConfig,
    bench_rooms,
    bench_table,
    expand_rows,
    instance_table,
    label_budget_figure,
    run_bench,
    separated,
)


def main(argv=None):
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="rows: " + "; ".join(f"{k} ({r.label})" for k, r in ROWS.items())
                                + ". groups: " + "; ".join(f"{g} = {','.join(ks)}" for g, ks in ROW_GROUPS.items()))
    p.add_argument("--out", default="bench_learning_out", help="results folder (cached runs are read back)")
    p.add_argument("--data", default=None, help="rooms folder (default OUT/rooms, generated on first use)")
    p.add_argument("--rows", default=",".join(d.rows), help="comma-separated row keys and groups (labels, instance), or 'all'")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    p.add_argument("--steps", type=int, default=d.steps, help="pre-training steps of every trained row")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                   help="PretrainConfig overrides for every row, e.g. crop_points=12000 'mask.ratio=0.6'")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with cores/jobs threads")
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-val", type=int, default=d.n_val)
    p.add_argument("--points", type=int, default=d.n_points)
    p.add_argument("--data-seed", type=int, default=d.data_seed,
                   help="seed of the generated rooms (another seed: rooms no setting was chosen on)")
    p.add_argument("--probe-epochs", type=int, default=d.probe_epochs)
    p.add_argument("--table-only", action="store_true", help="print the table of the runs cached under --out, run nothing")
    p.add_argument("--save-results", default=None, metavar="FILE",
                   help="with --table-only: also write the cached runs' results (without per-class IoUs) as one JSON list")
    a = p.parse_args(argv)
    rows = expand_rows([r.strip() for r in a.rows.split(",") if r.strip()])
    overrides = {}
    for item in a.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    cfg = BenchConfig(rows=rows, seeds=tuple(int(s) for s in a.seeds.split(",")), steps=a.steps, overrides=overrides,
                      n_train=a.n_train, n_val=a.n_val, n_points=a.points, data_seed=a.data_seed,
                      probe_epochs=a.probe_epochs)
    out = Path(a.out)
    if a.table_only:
        results = [json.loads(f.read_text()) for k in ROWS for f in sorted(out.glob(f"{k}/seed*/result.json"))]
        if not results:
            raise SystemExit(f"{out}: no cached results")
        print(bench_table(results) + "\n" + instance_table(results))
        label_budget_figure(results, out / "labels.png")
        if a.save_results:
            slim = [{k: ({m: v for m, v in x.items() if m != "per_class_iou"} if isinstance(x, dict) else x)
                     for k, x in r.items()} for r in results]
            Path(a.save_results).write_text(json.dumps(slim, indent=0, default=float) + "\n")
        return
    data = bench_rooms(a.data or out / "rooms", cfg.n_train, cfg.n_val, cfg.n_points, cfg.data_seed)
    t0 = time.time()
    results = run_bench(data, out, cfg, jobs=a.jobs)
    table = bench_table(results)
    if any(r.get("task") == "instance" for r in results):
        table += "\n" + instance_table(results)
    if any(r.get("labels") for r in results):
        label_budget_figure(results, out / "labels.png")
    header = (f"tiny preset, {cfg.steps} steps, {cfg.n_train} train / {cfg.n_val} val rooms of {cfg.n_points} points (room seed {cfg.data_seed}), "
              f"seeds {list(cfg.seeds)}, overrides {overrides or 'none'}; {os.cpu_count()} cores, torch "
              f"{torch.__version__}, {a.jobs} run(s) at once; wall {(time.time() - t0) / 60:.1f} min (cached runs free)")
    (out / "table.md").write_text(header + "\n\n" + table)
    print(header + "\n\n" + table)
    summary = {"rows": list(rows), "steps": cfg.steps}
    if "msm" in rows and "random" in rows:
        gap, apart = separated(results, "msm")
        summary.update(msm_minus_random_linear=round(gap, 2), ranges_apart=apart)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
