"""The probe at ScanNet scale: does its memory or its temporary disk grow with the number of training scenes?

Generates 4N synthetic rooms of ScanNet size (about 150k points each, `msm.data.make_samples`) and one validation
room, then runs the linear and kNN probes of a random `tiny` network (one pass over the data: one epoch) on the first N
and on all 4N training rooms, each run in its own child process (kNN bank of `--knn-bank` points per class, so that
scoring the validation room's 150k points stays within seconds on one core):

- `stream`: the streaming probe (`msm.probe_stream`, features on the fly on augmented crops, bounded kNN bank);
- `cached`: the cached probe as `msm probe` ran it before (features of every labelled training point kept in memory
  up to the 4 GB cache budget, float16 memmaps on disk beyond);
- `cached-disk`: the cached probe with a zero cache budget, i.e. what it does once the features pass the budget,
  as they do on ScanNet (~670 GB of float32 at 928 channels): every feature goes to temporary disk.

Peak RSS is the child's own `ru_maxrss` (`resource.getrusage(RUSAGE_SELF)` at its end, reported back as JSON);
peak temporary disk is the largest size of the child's private TMPDIR (where the probe's cache goes), polled by the
parent every 0.1 s. Ratios are 4N over N; a run that wrote no temporary file counts 1 byte, so no growth reads 1.0.
Goal of issue 20: the streaming probe's `rss_ratio` and `disk_ratio` both <= 1.25. Last line: one JSON object.

    python benchmarks/bench_probe_scale.py [--n 2] [--points 150000] [--engines stream,cached,cached-disk]
        [--epochs 1] [--threads 1] [--knn-bank 200] [--keep DIR]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ENGINES = {"stream": ("stream", None), "cached": ("cached", None), "cached-disk": ("cached", 0.0)}


def child(args) -> None:
    "One probe run (in a fresh process): print its peak RSS and timings as JSON on the last line."
    import torch

    torch.set_num_threads(args.threads)
    from msm.hunet import random_backbone
    from msm.probe import ProbeConfig
    from msm.probe_stream import probe_backbone

    engine, budget = ENGINES[args.child]
    cfg = ProbeConfig(epochs=args.epochs, warmup_epochs=0, progress=False, knn_max_per_class=args.knn_bank,
                      **({} if budget is None else {"cache_budget_gb": budget}))
    t = time.perf_counter()
    res = probe_backbone(random_backbone("tiny", 0), args.root, ("linear", "knn"), args.out, cfg, engine=engine)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    print(json.dumps({"rss": peak, "s": time.perf_counter() - t, "miou_linear": res["linear"]["miou"],
                      "train_points": res["knn"]["n_train_points"], "engine": res["linear"]["engine"]}))


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512  # allocated, as du counts
            except OSError:
                pass  # removed while walking
    return total


def measure(engine: str, root: Path, work: Path, args) -> dict:
    "Run one child with a private TMPDIR; its peak RSS (self-reported) and the peak size of that TMPDIR."
    tmp = work / f"tmp_{engine}_{root.name}"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", engine, "--root", str(root), "--out", str(work / f"out_{engine}_{root.name}"),
           "--epochs", str(args.epochs), "--threads", str(args.threads), "--knn-bank", str(args.knn_bank)]
    peak, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], folder_bytes(tmp))
            done.wait(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    done.set()
    watcher.join()
    if run.returncode != 0:
        sys.exit(f"bench_probe_scale: {engine} on {root.name} failed:\n{run.stderr[-3000:]}")
    res = json.loads(run.stdout.strip().splitlines()[-1])
    res["disk"] = peak[0]
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def make_roots(work: Path, n: int, points: int, seed: int = 0) -> tuple[Path, Path]:
    "data_all: 4n training rooms + 1 validation room; data_n: links to the first n of them and the same room."
    from msm.data import make_samples

    full = work / "data_all"
    make_samples(full, n_train=4 * n, n_val=1, seed=seed, n_points=points)
    small = work / "data_n"
    for split in ("train", "val"):
        (small / split).mkdir(parents=True)
        rooms = sorted((full / split).iterdir())
        for room in rooms[:n] if split == "train" else rooms:
            (small / split / room.name).symlink_to(room, target_is_directory=True)
    return small, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2, help="N: training rooms of the small run (the large one has 4N)")
    ap.add_argument("--points", type=int, default=150_000, help="points per room (ScanNet: ~150k)")
    ap.add_argument("--engines", default="stream,cached,cached-disk", help="comma-separated: stream, cached, cached-disk")
    ap.add_argument("--epochs", type=int, default=1, help="linear-probe epochs of each run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each child")
    ap.add_argument("--knn-bank", type=int, default=200, help="kNN bank points per class (default 200: scoring 150k "
                    "points against the default 5000 per class takes minutes on one core)")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    engines = [e for e in args.engines.split(",") if e]
    if any(e not in ENGINES for e in engines) or args.n < 1:
        sys.exit(f"bench_probe_scale: engines must be among {list(ENGINES)} and --n >= 1")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_probe_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        small, full = make_roots(work, args.n, args.points)
        print(f"{4 * args.n + 1} rooms of {args.points} points generated in {time.perf_counter() - t:.0f} s; "
              f"one epoch, tiny, {args.threads} thread(s) per run")
        out = {"n": args.n, "points": args.points}
        print(f"{'engine':12} {'scenes':>6} {'peak RSS MB':>12} {'peak tmp MB':>12} {'time s':>7}")
        for engine in engines:
            a, b = measure(engine, small, work, args), measure(engine, full, work, args)
            for k, r in ((args.n, a), (4 * args.n, b)):
                print(f"{engine:12} {k:>6} {r['rss'] / 2**20:>12.0f} {r['disk'] / 2**20:>12.1f} {r['s']:>7.1f}")
            key = engine.replace("-", "_")
            out[f"{key}_rss_mb"] = [round(a["rss"] / 2**20, 1), round(b["rss"] / 2**20, 1)]
            out[f"{key}_disk_mb"] = [round(a["disk"] / 2**20, 1), round(b["disk"] / 2**20, 1)]
            out[f"{key}_rss_ratio"] = round(b["rss"] / a["rss"], 3)
            out[f"{key}_disk_ratio"] = round(max(b["disk"], 1) / max(a["disk"], 1), 3)
            out[f"{key}_s"] = [round(a["s"], 1), round(b["s"], 1)]
        if "stream" in engines:
            out["rss_ratio"], out["disk_ratio"] = out["stream_rss_ratio"], out["stream_disk_ratio"]
            ok = out["rss_ratio"] <= 1.25 and out["disk_ratio"] <= 1.25
            print(f"streaming probe, 4N over N: RSS x{out['rss_ratio']}, temporary disk x{out['disk_ratio']} "
                  f"(goal <= 1.25: {'met' if ok else 'NOT met'})")
        print(json.dumps(out))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
