"""Cost of a BIN layer versus a BN layer in one full training step (not a test).

Times forward + backward + SGD step of torchvision networks (default: mobilenet_v2, resnet18,
resnet50; 64 and 96 px; NCHW and channels_last) with three norm layers:
  bn     nn.BatchNorm2d (the baseline),
  bin    domadapt's fused BatchInstanceNorm2d,
  naive  BIN written the obvious way: full F.batch_norm and full F.instance_norm, mixed by rho.
Repetitions are interleaved (bn, bin, naive, bn, ...) after a warm-up so that load from other
processes hits every variant alike; per case it prints medians and minima, the ratios bin/bn
of the medians and of the minima (the spread between them shows the run's noise) and
naive/bin, and at the end one markdown table of every case. --device cuda (with --dtype
bfloat16 for autocast) times on a GPU (synchronised steps; used by benchmarks/gpu_check.py).
Memory, two measures: "saved" = bytes autograd keeps from the forward pass for the backward
(unique storages, parameters excluded; exact, allocator-independent), and "peak" = peak
resident set (VmHWM, reset through /proc/self/clear_refs) during 3 steps of a fresh
subprocess minus its resident set before them (includes gradients, momentum, temporaries and
allocator caching; Linux only; ru_maxrss is no use here: it survives fork + exec).

    .venv/bin/python benchmarks/bench_bin.py --reps 12 --no-memory     # all 12 cases
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from domadapt.nn import BatchInstanceNorm2d
from domadapt.norms import convert_norm

VARIANTS = ("bn", "bin", "naive")
HAS_PROC = os.path.exists("/proc/self/clear_refs")  # Linux: peak resident memory measurable


class NaiveBIN(BatchInstanceNorm2d):
    """Reference BIN: two full normalisations, then the mix (autograd does the backward)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        x_b = F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training,
                           self.momentum, self.eps)
        x_i = F.instance_norm(x, eps=self.eps)
        rho = self.rho[:, None, None]
        return self.weight[:, None, None] * (rho * x_b + (1 - rho) * x_i) + self.bias[:, None, None]


def build(net: str, variant: str, channels_last: bool, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, net)(weights=None, num_classes=10)
    if variant != "bn":
        convert_norm(model, "bin")
        for name, module in list(model.named_modules()):
            for child_name, child in module.named_children():
                if isinstance(child, BatchInstanceNorm2d):
                    with torch.no_grad():
                        child.rho.uniform_(0.2, 0.8)
                    if variant == "naive":
                        naive = NaiveBIN(child.num_features, child.eps, child.momentum)
                        naive.load_state_dict(child.state_dict())
                        setattr(module, child_name, naive)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def make_input(batch: int, size: int, channels_last: bool, device: str,
               g: torch.Generator | None = None) -> Tensor:
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_step(model: nn.Module, batch: int, size: int, channels_last: bool, device: str = "cpu",
              dtype: torch.dtype = torch.float32):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = make_input(batch, size, channels_last, device, g)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    autocast = dtype != torch.float32

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def interleave(fns: dict[str, Callable[[], object]], reps: int,
               warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each of `fns`, `reps` times, the variants interleaved (a, b, c, a,
    b, c, ...) after `warmup` untimed rounds, so that load from other processes hits every
    variant alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def time_case(net: str, size: int, channels_last: bool, args: argparse.Namespace) -> dict:
    """One (net, size, layout) case: interleaved timings, saved and (optionally) peak memory."""
    dtype = getattr(torch, args.dtype)
    models = {v: build(net, v, channels_last, args.device) for v in VARIANTS}
    steps = {v: make_step(models[v], args.batch, size, channels_last, args.device, dtype)
             for v in VARIANTS}
    times = interleave(steps, args.reps, args.warmup)
    med = {v: statistics.median(times[v]) * 1e3 for v in VARIANTS}
    low = {v: min(times[v]) * 1e3 for v in VARIANTS}
    saved = {v: saved_activations_mib(models[v], args.batch, size, channels_last, args.device,
                                      dtype)
             for v in VARIANTS}
    memory = args.memory and args.device == "cpu" and HAS_PROC  # peak memory: Linux only
    peak = {v: peak_memory(net, v, size, channels_last, args) for v in VARIANTS} if memory else {}
    layout = "channels_last" if channels_last else "NCHW"
    print(f"{net}: batch {args.batch}, {size}px, {args.reps} interleaved reps, "
          f"{torch.get_num_threads()} thread(s), {layout}, {args.device}, {args.dtype}")
    for v in VARIANTS:
        line = (f"  {v:6s} median {med[v]:8.1f} ms (min {low[v]:8.1f})"
                f"  saved {saved[v]:7.1f} MiB")
        print(line + (f"  peak {peak[v]:7.1f} MiB" if peak else ""))
    case = {"net": net, "size": size, "layout": layout, "bn_ms": med["bn"],
            "bin_bn": med["bin"] / med["bn"], "bin_bn_min": low["bin"] / low["bn"],
            "naive_bin": med["naive"] / med["bin"], "saved_bin_bn": saved["bin"] / saved["bn"],
            "peak_bin_bn": peak["bin"] / peak["bn"] if peak else None}
    print(f"  time   bin/bn {case['bin_bn']:.3f} (of minima {case['bin_bn_min']:.3f})"
          f"   naive/bin {case['naive_bin']:.3f}")
    print(f"  saved  bin/bn {case['saved_bin_bn']:.3f}   "
          f"naive/bin {saved['naive'] / saved['bin']:.3f}")
    if peak:
        print(f"  peak   bin/bn {case['peak_bin_bn']:.3f}   "
              f"naive/bin {peak['naive'] / peak['bin']:.3f}")
    sys.stdout.flush()
    return case


def summary(cases: list[dict]) -> str:
    """Every case as one markdown table."""
    head = ("| net | layout | px | BN ms (median) | **fused BIN / BN** median | of minima "
            "| naive / fused | saved BIN / BN |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for c in cases:
        lines.append(f"| {c['net']} | {c['layout']} | {c['size']} | {c['bn_ms']:.1f} "
                     f"| **{c['bin_bn']:.3f}** | {c['bin_bn_min']:.3f} | {c['naive_bin']:.3f} "
                     f"| {c['saved_bin_bn']:.3f} |")
    worst = max(cases, key=lambda c: c["bin_bn"])
    lines.append(f"\nworst fused BIN / BN (median): {worst['bin_bn']:.3f} "
                 f"({worst['net']}, {worst['layout']}, {worst['size']} px)")
    return "\n".join(lines)


def time_nets(args: argparse.Namespace) -> list[dict]:
    cases = [time_case(net, size, layout == "channels_last", args)
             for net in args.nets for size in args.sizes for layout in args.layouts]
    print(summary(cases))
    return cases


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """Peak resident memory of 3 training steps above the resident memory before them."""
    torch.set_num_threads(args.threads)
    channels_last = args.layouts == ["channels_last"]
    step = make_step(build(args.child_net, args.child_variant, channels_last), args.batch,
                     args.sizes[0], channels_last)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = _proc_status_mib("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps({"peak_extra_mib": _proc_status_mib("VmHWM") - before}))


def peak_memory(net: str, variant: str, size: int, channels_last: bool,
                args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--child-net", net, "--child-variant", variant,
           "--batch", str(args.batch), "--sizes", str(size), "--threads", str(args.threads),
           "--layouts", "channels_last" if channels_last else "nchw"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_mib"]


def saved_activations_mib(model: nn.Module, batch: int, size: int, channels_last: bool,
                          device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Bytes autograd keeps for backward (unique storages, parameters excluded), in MiB."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    x = make_input(batch, size, channels_last, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = model(x)
    del out
    return sum(storages.values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", type=lambda s: s.split(","),
                   default=["mobilenet_v2", "resnet18", "resnet50"])
    p.add_argument("--reps", type=int, default=12, help="timed steps per variant, interleaved")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[64, 96],
                   help="input sizes in px, comma-separated")
    p.add_argument("--layouts", type=lambda s: s.split(","), default=["nchw", "channels_last"],
                   help="nchw and/or channels_last, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (float32: no autocast)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--child-net", help=argparse.SUPPRESS)
    p.add_argument("--child-variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    bad = set(args.layouts) - {"nchw", "channels_last"}
    if bad:
        p.error(f"unknown layout(s) {', '.join(sorted(bad))}; choose nchw, channels_last")
    if args.child_net:
        child(args)
        return
    torch.set_num_threads(args.threads)
    time_nets(args)


if __name__ == "__main__":
    main()
