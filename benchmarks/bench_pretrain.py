"""Pre-training step speed and memory: one masked-scene-modeling step (student forward on the masked view, teacher
forward on the other view, per-level matched loss, backward, AdamW, EMA update) against its peer measured in the same
process: a supervised step of the same backbone on the same student view (forward, a linear head on the finest level,
cross-entropy, backward, AdamW). The ratio msm / supervised is the price of the objective on top of the backbone.

For each preset (`tiny`, `ablation`) a child process builds a batch of synthetic rooms with the preset's sampler
(crop, two views, voxelisation, mask, matches), then runs warm-up steps and interleaved timed rounds of both steps;
medians are reported. Also reported: data preparation per scene (the DataLoader workers' job), points per second
(input points of both views), loss voxels per second per level, and peak memory (CUDA: max allocated; CPU: the child's
peak resident set, of which the part above the process before the model was built).

    python benchmarks/bench_pretrain.py [--presets tiny,ablation] [--steps 3] [--warmup 1] [--threads 2]
                                        [--batch N] [--crop-tiny N] [--crop-ablation N] [--device cpu|cuda]

Defaults on CPU keep the run within a few minutes on 2 cores: batch 2 scenes, the preset's crop for tiny (8 000
points) and 20 000 points for ablation (the preset's 240 000 and batch 12 on CUDA). OMP_WAIT_POLICY=PASSIVE is set unless the environment sets it
(spinning OpenMP threads collapse on a shared machine). Last line: one JSON object with the figures.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(preset: str, args) -> dict:
    "Measure one preset in this process; returns the figures."
    import numpy as np
    import torch
    import torch.nn as nn

    from msm.data import synthetic_room
    from msm.pretrain import MSM, PretrainConfig, n_levels
    from msm.sparse import SparseTensor

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = PretrainConfig.preset(preset)
    crop = args.crop_tiny if preset == "tiny" else args.crop_ablation
    if crop is None:
        crop = cfg.crop_points if dev.type == "cuda" or preset == "tiny" else 20_000
    batch_size = args.batch or (cfg.batch_size if dev.type == "cuda" else 2)
    cfg = cfg.replace(crop_points=crop, batch_size=batch_size)
    scenes = [synthetic_room(i, n_points=max(int(crop * 1.25), 40_000)) for i in range(batch_size)]
    sampler = MSM.build_sampler(cfg)
    t0 = time.perf_counter()
    samples = [sampler(s, np.random.default_rng(i), 0, 1000) for i, s in enumerate(scenes)]
    data_ms = (time.perf_counter() - t0) * 1000 / batch_size
    from msm.core import to_device
    batch = to_device(MSM.collate(samples), dev)
    rss0 = _rss_mb()
    torch.manual_seed(0)
    model = MSM.build_model(cfg).to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def msm_step():
        with torch.autocast(**amp):
            res = model(batch)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        model.update_teacher(0.996)
        return res

    with torch.no_grad():
        fine_channels = model.student(SparseTensor(batch["student_feats"], batch["student_coords"]))[0].feats.shape[1]
    head = nn.Linear(fine_channels, 20).to(dev)
    sup_opt = torch.optim.AdamW(list(model.student.parameters()) + list(head.parameters()), lr=1e-4)
    labels = torch.randint(0, 20, (len(batch["student_coords"]),), device=dev)

    def sup_step():
        with torch.autocast(**amp):
            levels = model.student(SparseTensor(batch["student_feats"], batch["student_coords"]))
            loss = nn.functional.cross_entropy(head(levels[0].feats).float(), labels)
        sup_opt.zero_grad(set_to_none=True)
        loss.backward()
        sup_opt.step()

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        _, res = timed(msm_step)
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    peak_rss = _rss_mb()
    for _ in range(args.warmup):
        timed(sup_step)
    t_msm, t_sup = [], []
    for _ in range(args.steps):  # interleaved rounds
        t, res = timed(msm_step)
        t_msm.append(t)
        t_sup.append(timed(sup_step)[0])
    ms, sup = statistics.median(t_msm), statistics.median(t_sup)
    out = {"preset": preset, "device": str(dev), "threads": args.threads, "batch": batch_size, "crop": crop,
           "voxels_student": len(batch["student_coords"]), "points": batch["n_points"],
           "msm_ms": ms * 1000, "supervised_ms": sup * 1000, "overhead": ms / sup, "steps_per_s": 1 / ms,
           "data_ms_per_scene": data_ms, "points_per_s": batch["n_points"] / ms,
           "peak_mb": peak_cuda if peak_cuda is not None else peak_rss,
           "model_mb": (peak_cuda if peak_cuda is not None else peak_rss - rss0),
           "params": sum(p.numel() for p in model.student.parameters())}
    for lv in range(n_levels(cfg.model)):
        if f"voxels_l{lv}" in res:
            out[f"loss_voxels_per_s_l{lv}"] = float(res[f"voxels_l{lv}"]) / ms
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,ablation")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--crop-tiny", type=int, default=None)
    p.add_argument("--crop-ablation", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    results = {}
    for preset in args.presets.split(","):
        cmd = [sys.executable, __file__, "--child", preset] + [a for a in sys.argv[1:]]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"bench_pretrain: preset {preset} failed")
        results[preset] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load {os.getloadavg()[0]:.2f}")
    head = ("preset", "device", "batch", "crop", "voxels", "msm ms", "sup. ms", "msm/sup", "steps/s", "data ms/scene",
            "Mpts/s", "peak MB")
    print(" | ".join(head))
    for r in results.values():
        print(" | ".join(str(x) for x in (r["preset"], r["device"], r["batch"], r["crop"], r["voxels_student"],
                                           f"{r['msm_ms']:.0f}", f"{r['supervised_ms']:.0f}", f"{r['overhead']:.2f}",
                                           f"{r['steps_per_s']:.2f}", f"{r['data_ms_per_scene']:.0f}",
                                           f"{r['points_per_s'] / 1e6:.3f}", f"{r['peak_mb']:.0f}")))
        lv = sorted(k for k in r if k.startswith("loss_voxels_per_s_l"))
        print("  loss voxels / s per level: " + ", ".join(f"l{k[-1]} {r[k]:.0f}" for k in lv))
    flat = {f"{p}_{k}": v for p, r in results.items() for k, v in r.items() if isinstance(v, (int, float))}
    flat["device"] = args.device
    print(json.dumps(flat))


if __name__ == "__main__":
    main()
