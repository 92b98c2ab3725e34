"""GPU check (`make gpu-check`): the one command to run the first time a CUDA machine is at hand.

At most 10 minutes (a device call's limit), every step with its own time limit:
1. The CUDA tests (`-k cuda` in tests/test_bin.py and tests/test_devices.py): the fused BIN
   layer against the two-pass reference on the GPU (float64/float32, both layouts), bf16
   autocast, and a short training run on CUDA with AMP and channels_last.
2. benchmarks/bench_bin.py on the GPU, float32 and bfloat16 autocast, NCHW and channels_last
   (the fused BIN / BN ratio of every case).
3. A 200-iteration `pacs-cpu`-sized DANN + BIN run on CUDA with AMP (MobileNetV2, 96 px,
   batch 32 + 32): on ../shared/data/pacs (art_painting -> sketch) with
   ../shared/weights/mobilenet_v2_imagenet_features.pth when present, else on the embedded
   styledigits (gray -> sketch) from scratch.
4. The same run with `--compile` (issue #29: BIN as custom operators under torch.compile, with
   bf16 autocast): summary.md sets its images per second and accuracy beside the eager run's.

Everything goes to benchmarks/gpu/<device name>/: each step's output (`*.txt`), the run
directories (`run/`, `run-compiled/`) and `summary.md` (device, torch, each step's status and time, the run's
accuracy). Without a CUDA device it prints one line and exits 0. Exit status: 0 when every
step passed, else 1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PACS = SHARED / "data" / "pacs"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout: int  # seconds


def slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "cuda"


def steps(out: Path) -> list[Step]:
    """The check's commands, in order; their outputs go under `out`."""
    py = sys.executable
    bench = [py, "benchmarks/bench_bin.py", "--device", "cuda", "--reps", "20", "--warmup", "5",
             "--no-memory"]
    data = (["--root", str(PACS), "--source", "art_painting", "--target", "sketch"]
            if PACS.is_dir() else
            ["--dataset", "styledigits", "--source", "gray", "--target", "sketch"])
    weights = str(WEIGHTS) if WEIGHTS.is_file() else "none"
    train = [py, "-m", "cli", "train", "--preset", "pacs-cpu", *data, "--method", "dann",
             "--norm", "bin", "--pretrained", weights, "--iters", "200", "--eval-every", "100",
             "--checkpoint-every", "100", "--amp", "--device", "cuda", "--quiet",
             "--out", str(out / "run")]
    return [
        Step("cuda-tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                            "tests/test_bin.py", "tests/test_devices.py"], 150),
        Step("bench-float32", [*bench, "--dtype", "float32"], 100),
        Step("bench-bfloat16", [*bench, "--dtype", "bfloat16"], 100),
        Step("dann-bin-amp-200", train, 120),
        Step("dann-bin-amp-compile-200", [*train[:-1], str(out / "run-compiled"), "--compile"],
             130),
    ]


def run_step(step: Step, out: Path) -> tuple[str, float]:
    """Run `step`, its output teed to the terminal and out/<name>.txt; (status, seconds)."""
    print(f"gpu-check: {step.name}: {' '.join(step.argv[1:])}", flush=True)
    t0 = time.monotonic()
    with open(out / f"{step.name}.txt", "w") as log:
        try:
            proc = subprocess.run(step.argv, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=step.timeout,
                                  check=False)
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            text = proc.stdout
        except subprocess.TimeoutExpired as e:
            status = f"timed out after {step.timeout} s"
            text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (
                e.stdout or "")
        log.write(text)
    print(text, end="", flush=True)
    return status, time.monotonic() - t0


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: skipped, no CUDA device")
        return 0
    name = torch.cuda.get_device_name()
    out = ROOT / "benchmarks" / "gpu" / slug(name)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check on {name} -> {out}", flush=True)
    rows = []
    for step in steps(out):
        status, seconds = run_step(step, out)
        rows.append(f"| {step.name} | {status} | {seconds:.0f} | `{' '.join(step.argv[1:])}` |")
    runs = {}
    for label, folder in (("eager", "run"), ("compiled", "run-compiled")):
        metrics = out / folder / "metrics.json"
        runs[label] = {k: v for k, v in json.loads(metrics.read_text()).items()
                       if k in ("target_acc", "source_acc", "mean_gate", "images_per_second")
                       or "seconds" in k} if metrics.is_file() else "no metrics.json"
    lines = [f"# gpu-check on {name}", "",
             (f"{time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, CUDA "
             f"{torch.version.cuda}, capability {torch.cuda.get_device_capability()}"), "",
             "| step | status | s | command |", "|---|---|---:|---|", *rows, "",
             *(f"DANN + BIN run (AMP, 200 iterations, {label}): {run}"
               for label, run in runs.items())]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("| passed |" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
