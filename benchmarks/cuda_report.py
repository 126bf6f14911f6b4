"""Run every CUDA check and GPU benchmark on a CUDA machine and write one short markdown report.

    python benchmarks/cuda_report.py --out cuda_report.md [--quick] [--skip-bench]

1. Environment: GPU, driver, torch / CUDA, torchsparse and spconv versions (when importable).
2. Tests: the whole pytest suite (not `slow`) with CUDA present, so every `cuda`-marked test and every CPU/CUDA
   parametrised test runs; the counts and any failure go into the report.
3. Benchmarks (their last JSON line each): the sparse engine against torchsparse / spconv at 90k and 900k voxels
   (fp32), HUNet `tiny` / `ablation` / `paper` cost on CUDA, pre-training steps per second, and multi-resolution
   feature sampling against the official dense-grid method.
Nothing here is required on CPU machines: without CUDA the script says so and exits 0.

Where commands are limited in time (a lent machine), run it in chunks, each writing its own report:

    python benchmarks/cuda_report.py --skip-bench --out tests.md                          # tests only
    python benchmarks/cuda_report.py --skip-tests --bench-only "sparse conv" --out sparse.md
    python benchmarks/cuda_report.py --skip-tests --bench-only "HUNet" --out hunet.md
    python benchmarks/cuda_report.py --skip-tests --bench-only "pre-training" "sampling" --out rest.md
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd: list, timeout: int, env=None) -> tuple[int, str, float]:
    "Run cmd from the repository root; return (status, combined output, seconds)."
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        return r.returncode, r.stdout + r.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        return 124, (e.stdout or "") + (e.stderr or "") if isinstance(e.stdout, str) else "timeout", time.time() - t0


def last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        env["driver"] = None
    for mod in ("torchsparse", "spconv", "flash_attn", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed, or broken build
            env[mod] = None
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="cuda_report.md")
    ap.add_argument("--quick", action="store_true", help="fewer benchmark repeats")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--bench-only", nargs="+", default=None, metavar="WORD",
                    help="run only the benchmarks whose title contains one of these words (e.g. 'sparse' 'Triton')")
    ap.add_argument("--all-tests", action="store_true", help="run the whole suite, not only the device-parametrised files")
    ap.add_argument("--junit", default=None, help="also keep pytest's junit xml here")
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check")
        return 0
    env = environment()
    lines = [f"# CUDA report ({time.strftime('%Y-%m-%d')})", "",
             "| item | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()] + [""]
    py = sys.executable
    if not a.skip_tests:
        junit = a.junit or "/tmp/msm_cuda_junit.xml"
        scope = ["tests"] if a.all_tests else ["tests/test_sparse.py", "tests/test_fused_conv.py", "tests/test_voxelize.py",
                                                   "tests/test_cuda.py"]
        st, out, sec = sh([py, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           *scope], timeout=3000)
        summary = next((ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", ln)), "no summary")
        cuda_st, cuda_out, _ = sh([py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"], timeout=1800)
        cuda_summary = next((ln for ln in reversed(cuda_out.splitlines()) if re.search(r"\d+ (passed|failed)", ln)), "no summary")
        lines += ["## Tests", "", f"- {'whole suite' if a.all_tests else 'engine, voxelizer and CUDA test files'} (not slow) with CUDA present: `{summary.strip()}` ({sec:.0f} s)",
                  f"- `cuda`-marked tests only: `{cuda_summary.strip()}`", ""]
        fails = [ln for ln in (out + cuda_out).splitlines() if ln.startswith(("FAILED", "ERROR"))]
        if fails:
            lines += ["Failures:", ""] + [f"- `{f[:200]}`" for f in dict.fromkeys(fails)] + [""]
        print(out[-3000:])
    if not a.skip_bench:
        rep = ["--repeats", "5"] if a.quick else []
        benches = [("sparse conv, fp32", ["benchmarks/bench_sparse_gpu.py", *rep]),
                   ("sparse conv, bf16", ["benchmarks/bench_sparse_gpu.py", "--dtype", "bfloat16", *rep]),
                   ("HUNet", ["benchmarks/bench_hunet.py", "--device", "cuda", "--presets", "tiny", "ablation", "paper"]),
                   ("HUNet paper, 240k-point scenes, largest batch, bf16",
                    ["benchmarks/bench_hunet.py", "--device", "cuda", "--presets", "paper", "--batch-search", "240000",
                     "--amp", "bf16"]),
                   ("HUNet paper, 240k-point scenes, largest batch, bf16, Triton convolutions",
                    ["benchmarks/bench_hunet.py", "--device", "cuda", "--presets", "paper", "--batch-search", "240000",
                     "--amp", "bf16"], {"MSM_SPARSE_BACKEND": "triton"}),
                   ("pre-training", ["benchmarks/bench_pretrain.py", "--device", "cuda", "--presets", "ablation,paper"]),
                   ("pre-training, Triton convolutions", ["benchmarks/bench_pretrain.py", "--device", "cuda", "--presets",
                                                          "ablation,paper"], {"MSM_SPARSE_BACKEND": "triton"}),
                   ("feature sampling", ["benchmarks/bench_probe.py", "--device", "cuda"])]
        lines += ["## Benchmarks", ""]
        if a.bench_only:
            benches = [b for b in benches if any(w.lower() in b[0].lower() for w in a.bench_only)]
        for name, cmd, *env in benches:
            if not (ROOT / cmd[0]).exists():
                lines += [f"### {name}", "", f"`{cmd[0]}` not present", ""]
                continue
            st, out, sec = sh([py, *cmd], timeout=1200, env=env[0] if env else None)
            print(f"== {name} ({sec:.0f} s, status {st})\n{out[-4000:]}")
            table = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("{")][-40:]
            lines += [f"### {name} (`{' '.join(cmd)}`, {sec:.0f} s, status {st})", "", "```", *table, "```", "",
                      "JSON: `" + json.dumps(last_json(out)) + "`", ""]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
