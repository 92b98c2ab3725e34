"""GPU check for BIN (`make gpu-check`): run on a CUDA machine, skips cleanly elsewhere.

1. The CUDA tests of tests/test_bin.py (`-k cuda`: the fused layer against the two-pass
   reference on the GPU in float64/float32 and both layouts, and bf16 autocast).
2. benchmarks/bench_bin.py on the GPU, float32 and bfloat16 autocast, NCHW and channels_last,
   which prints the fused BIN / BN ratios of every case.

Without a CUDA device it prints one line and exits 0. Exit status: the tests' status, or the
first failing benchmark's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: skipped, no CUDA device")
        return 0
    print(f"gpu-check on {torch.cuda.get_device_name()}", flush=True)
    status = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-k", "cuda", "tests/test_bin.py"], check=False,
                            cwd=ROOT).returncode
    for dtype in ("float32", "bfloat16"):
        bench = subprocess.run([sys.executable, "benchmarks/bench_bin.py", "--device", "cuda",
                                "--dtype", dtype, "--reps", "20", "--warmup", "5",
                                "--no-memory"], check=False, cwd=ROOT)
        status = status or bench.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
