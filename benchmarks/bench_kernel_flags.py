"""Speed of the BIN C kernels by compiler flags, and against the torch path (not a test).

Builds `domadapt/nn/bin_kernels.c` with
  old      the flags before issue #25: -O3 -march=native -fno-math-errno -fopenmp
  new      `kernel_flags()`: an explicit ISA level, -ffp-contract=off, -fopenmp
  nothreads `kernel_flags(threads=False)`: -fopenmp-simd instead of -fopenmp (what a Mac
           without libomp builds; bit-identical to `new` on one thread)
and times, one thread, repetitions interleaved (old, new, nothreads, torch, bn, old, ...):
  layers   forward + backward of one BIN layer on MobileNetV2's shapes at 64 px, batch 32
           (`torch`: the torch-op path that runs where no C kernel does; `bn`: nn.BatchNorm2d)
  steps    a whole MobileNetV2 training step (bench_bin.py's), 64 px, batch 32
Prints markdown tables: medians and the ratios of medians (and of minima: their gap is the
run's noise).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kernel_flags.py
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bin import build, interleave, make_step

from domadapt.nn import BatchInstanceNorm2d
from domadapt.nn import bin_kernel as kernels

OLD_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
# MobileNetV2's BN shapes at 64 px input (C, H = W), one of each kind
LAYERS = [(32, 32), (96, 32), (144, 16), (192, 8), (384, 4), (576, 4), (960, 2), (1280, 2)]


def build_kernels(tmp: Path) -> dict[str, ctypes.CDLL]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("bench_kernel_flags: needs a C compiler")
    src = tmp / "bin_kernels.c"
    src.write_bytes(kernels.kernel_source().encode())
    libs = {}
    for name, flags in (("old", OLD_FLAGS), ("new", kernels.kernel_flags()),
                        ("nothreads", kernels.kernel_flags(threads=False))):
        so = tmp / f"{name}.so"
        subprocess.run([cc, *flags, str(src), "-o", str(so), "-lm"], check=True)
        libs[name] = ctypes.CDLL(str(so))
        print(f"{name:9s} {' '.join(flags)}")
    return libs


def use(lib: ctypes.CDLL | None) -> None:
    """Make the BIN layer call `lib` (None: the torch path)."""
    kernels._c_tried, kernels._c_lib = True, lib
    if lib is not None:
        kernels._c_fns.clear()
        kernels._bind(lib)


def variants(libs: dict[str, ctypes.CDLL], make: Callable[[str], Callable[[], None]]):
    """One timed callable per kernel variant (+ torch path, + BN), each selecting its kernel."""
    def selected(lib: ctypes.CDLL | None, f: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            use(lib)
            f()
        return run
    fns = {k: selected(lib, make("bin")) for k, lib in libs.items()}
    fns["torch"] = selected(None, make("bin"))
    fns["bn"] = make("bn")
    return fns


def layer_fn(kind: str, c: int, hw: int, channels_last: bool, batch: int, inner: int):
    torch.manual_seed(0)
    layer: nn.Module = BatchInstanceNorm2d(c) if kind == "bin" else nn.BatchNorm2d(c)
    if kind == "bin":
        with torch.no_grad():
            layer.rho.uniform_(0.2, 0.8)
    x = torch.randn(batch, c, hw, hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn_like(x)

    def run() -> None:
        for _ in range(inner):
            y = layer(x)
            y.backward(g)
    return run


def row(name: str, t: dict[str, list], cols: list[str]) -> str:
    med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    low = {k: min(v) * 1e3 for k, v in t.items()}
    ratios = [f"{med[a] / med[b]:.3f} ({low[a] / low[b]:.3f})" for a, b in
              (("new", "old"), ("nothreads", "new"), ("torch", "new"), ("new", "bn"),
               ("torch", "bn"))]
    return f"| {name} | " + " | ".join(f"{med[k]:.2f}" for k in cols) + " | " + \
        " | ".join(ratios) + " |"


HEAD = ("| case | old ms | new ms | nothreads ms | torch ms | BN ms | new / old | "
        "nothreads / new | torch / new | new / BN | torch / BN |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per variant (layers)")
    p.add_argument("--inner", type=int, default=5, help="forward+backward calls per repetition")
    p.add_argument("--step-reps", type=int, default=12, help="timed steps per variant (net)")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    cols = ["old", "new", "nothreads", "torch", "bn"]
    with tempfile.TemporaryDirectory() as tmp:
        libs = build_kernels(Path(tmp))
        print(f"\ntorch {torch.__version__}, 1 thread, batch {args.batch}; medians, ratios of "
              f"medians (of minima)\n\nOne BIN layer, forward + backward (x{args.inner}), "
              f"{args.reps} interleaved reps\n\n{HEAD}")
        for layout in ("NCHW", "channels_last"):
            for c, hw in LAYERS:
                t = interleave(variants(libs, lambda kind, c=c, hw=hw, cl=layout != "NCHW":
                                        layer_fn(kind, c, hw, cl, args.batch, args.inner)),
                    args.reps, warmup=3)
                print(row(f"{layout} C={c} {hw}x{hw}", t, cols), flush=True)
        print(f"\nmobilenet_v2 training step (64 px), {args.step_reps} interleaved reps\n\n"
              f"{HEAD}")
        for layout in ("NCHW", "channels_last"):
            cl = layout == "channels_last"
            t = interleave(variants(libs, lambda kind, cl=cl: make_step(
                build("mobilenet_v2", kind, cl), args.batch, 64, cl)), args.step_reps, warmup=2)
            print(row(f"mobilenet_v2 {layout}", t, cols), flush=True)


if __name__ == "__main__":
    main()
