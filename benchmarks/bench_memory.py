"""Memory of one pre-training step per scene, by preset, with and without `HUNetConfig.checkpoint`: what a researcher
needs to choose the number of scenes per GPU (`batch_size` / processes) and `accum_steps`.

Measured, on any device (CPU by default), for one MSM step on one ScanNet-size synthetic scene (about 150k points,
`synthetic_room` at that size, cropped and voxelised by the preset's own sampler):
- the bytes the student's autograd graph keeps for the backward pass (the activation memory that grows with the
  scenes of a micro-batch), counted exactly with `torch.autograd.graph.saved_tensors_hooks` (each storage once);
- the fixed memory of a run: parameters, their gradients, AdamW's two moments and the EMA teacher (fp32);
- on CUDA also the step's peak allocation (`torch.cuda.max_memory_allocated`).
The peer is the same step without checkpointing (ratio = without / with).

    python benchmarks/bench_memory.py [--presets tiny,ablation,paper] [--points 150000] [--device cpu|cuda]

Last line: one JSON object with the figures (GB per scene).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


def saved_bytes(fn) -> tuple[int, object]:
    "Run `fn()` and count the bytes of the distinct storages autograd saves for the backward pass."
    import torch
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device)] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def measure(preset: str, points: int, checkpoint: bool, device: str) -> dict:
    import numpy as np
    import torch

    from msm.core import to_device
    from msm.data import synthetic_room
    from msm.pretrain import MSM, PretrainConfig

    dev = torch.device(device)
    cfg = PretrainConfig.preset(preset).replace(**{"model.checkpoint": checkpoint, "batch_size": 1})
    scene = synthetic_room(0, n_points=points)
    batch = MSM.collate([MSM.build_sampler(cfg)(scene, np.random.default_rng(0), 0, 1000)])
    module = MSM.build_model(cfg).to(dev).train()
    batch = to_device(batch, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        act, res = saved_bytes(lambda: module(batch))
    res["loss"].backward()
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in module.student.parameters())
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    fixed = 4 * (n_params + 3 * n_train)  # teacher copy + (weights, gradients, two AdamW moments) of what trains
    out = {"preset": preset, "checkpoint": checkpoint, "voxels": int(len(batch["student_coords"])),
           "activations_gb": act / 2**30, "fixed_gb": fixed / 2**30, "params_m": n_params / 1e6, "seconds": seconds}
    if dev.type == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,ablation,paper", help="comma-separated presets (default: all three)")
    ap.add_argument("--points", type=int, default=150_000, help="points of the scene (ScanNet's mean is about 150k)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'preset':<9} {'checkpoint':<10} {'voxels':>8} {'activations GB/scene':>21} {'fixed GB':>9} {'s':>6}")
    for preset in args.presets.split(","):
        for ck in (False, True):
            r = measure(preset, args.points, ck, args.device)
            rows.append(r)
            print(f"{preset:<9} {str(ck):<10} {r['voxels']:>8} {r['activations_gb']:>21.2f} {r['fixed_gb']:>9.2f} "
                  f"{r['seconds']:>6.1f}", flush=True)
    summary = {"device": args.device, "points": args.points, "rows": rows}
    for preset in args.presets.split(","):
        a, b = [r["activations_gb"] for r in rows if r["preset"] == preset]
        summary[f"{preset}_ratio"] = a / max(b, 1e-12)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
