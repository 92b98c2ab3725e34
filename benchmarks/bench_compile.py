"""Eager and compiled training steps, BN against BIN (issue #29; not a test).

Times forward + backward + SGD step of torchvision networks (default: mobilenet_v2, resnet18,
resnet50 at 96 px, NCHW and channels_last, one thread, batch 64 = a pacs-cpu DANN step's
source + target) in five variants:
  bn          eager nn.BatchNorm2d (the baseline every ratio divides by),
  bin         eager BIN (the C kernel), activations as separate modules,
  bin_act     eager BIN with its ReLU/ReLU6 fused (`domadapt.nn.bin_fusion`; ResNet has no
              fusible pattern, so there it equals bin),
  bn_c        torch.compile(bn model)   (inductor),
  bin_c       torch.compile(bin_act model), what `--compile` trains (BIN as custom operators).
Repetitions are interleaved (bn, bin, bin_act, bn_c, bin_c, bn, ...) after a warm-up, so load
from other processes hits every variant alike; per case it prints medians and minima and the
ratios to eager BN side by side, and at the end one markdown table. Compile time: the first
compiled step (forward and backward graphs) minus the median step afterwards, each compiled
variant with caches of its own (`torch._inductor.utils.fresh_cache`: a new cache folder and
inductor's in-memory caches cleared, as in a first run on a machine) unless --warm-cache.

    .venv/bin/python benchmarks/bench_compile.py --reps 12        # the table (quiet machine)
    .venv/bin/python benchmarks/bench_compile.py --nets mobilenet_v2 --layouts channels_last \
        --reps 2 --warmup 1                                       # does it run?
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time

import torch
from bench_bin import build, interleave, make_step  # beside this script
from torch._inductor.utils import fresh_cache

from domadapt.nn.bin_fusion import fuse_activations

VARIANTS = ("bn", "bin", "bin_act", "bn_c", "bin_c")


def models(net: str, channels_last: bool) -> tuple[dict[str, torch.nn.Module], int]:
    """The five variants' networks (same weights per norm) and how many activations fused."""
    bn, plain = build(net, "bn", channels_last), build(net, "bin", channels_last)
    fused = copy.deepcopy(plain)
    count = fuse_activations(fused)
    compiled_bn, compiled_bin = copy.deepcopy(bn), copy.deepcopy(fused)
    compiled_bn.compile()
    compiled_bin.compile()
    return {"bn": bn, "bin": plain, "bin_act": fused, "bn_c": compiled_bn,
            "bin_c": compiled_bin}, count


def time_case(net: str, channels_last: bool, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()
    nets, fused = models(net, channels_last)
    steps = {v: make_step(nets[v], args.batch, args.size, channels_last) for v in VARIANTS}
    first: dict[str, float] = {}
    for v in VARIANTS:  # the compiled ones compile here
        cold = v.endswith("_c") and not args.warm_cache
        with fresh_cache() if cold else contextlib.nullcontext():
            t0 = time.perf_counter()
            steps[v]()
            first[v] = time.perf_counter() - t0
    times = interleave(steps, args.reps, args.warmup)
    med = {v: statistics.median(times[v]) * 1e3 for v in VARIANTS}
    low = {v: min(times[v]) * 1e3 for v in VARIANTS}
    compile_s = {v: first[v] - med[v] / 1e3 for v in ("bn_c", "bin_c")}
    layout = "channels_last" if channels_last else "NCHW"
    print(f"{net}: batch {args.batch}, {args.size}px, {args.reps} interleaved reps, "
          f"{torch.get_num_threads()} thread(s), {layout}; {fused} activations fused")
    for v in VARIANTS:
        print(f"  {v:8s} median {med[v]:8.1f} ms (min {low[v]:8.1f})  "
              f"/bn {med[v] / med['bn']:.3f} (of minima {low[v] / low['bn']:.3f})")
    print(f"  compile: bn {compile_s['bn_c']:.1f} s, bin {compile_s['bin_c']:.1f} s")
    sys.stdout.flush()
    return {"net": net, "layout": layout, "size": args.size, "bn_ms": med["bn"],
            **{f"{v}_bn": med[v] / med["bn"] for v in VARIANTS[1:]},
            "compile_bn_s": compile_s["bn_c"], "compile_bin_s": compile_s["bin_c"]}


def summary(cases: list[dict]) -> str:
    head = ("| net | layout | px | eager BN ms (median) | eager BIN / BN | eager BIN+act / BN "
            "| compiled BN / BN | compiled BIN / BN | compile s (BN, BIN) |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        lines.append(f"| {c['net']} | {c['layout']} | {c['size']} | {c['bn_ms']:.1f} "
                     f"| {c['bin_bn']:.3f} | {c['bin_act_bn']:.3f} | {c['bn_c_bn']:.3f} "
                     f"| **{c['bin_c_bn']:.3f}** | {c['compile_bn_s']:.0f}, "
                     f"{c['compile_bin_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", type=lambda s: s.split(","),
                   default=["mobilenet_v2", "resnet18", "resnet50"])
    p.add_argument("--reps", type=int, default=12, help="timed steps per variant, interleaved")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=96, help="input size in px")
    p.add_argument("--layouts", type=lambda s: s.split(","), default=["nchw", "channels_last"],
                   help="nchw and/or channels_last, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--warm-cache", action="store_true",
                   help="keep inductor's usual cache (compile times then show cache hits)")
    args = p.parse_args()
    bad = set(args.layouts) - {"nchw", "channels_last"}
    if bad:
        p.error(f"unknown layout(s) {', '.join(sorted(bad))}; choose nchw, channels_last")
    torch.set_num_threads(args.threads)
    cases = [time_case(net, layout == "channels_last", args)
             for net in args.nets for layout in args.layouts]
    print(summary(cases))


if __name__ == "__main__":
    main()
