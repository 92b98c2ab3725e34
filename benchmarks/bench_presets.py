"""Whole training steps of the presets, and the memory layout per backbone (not a test).

`steps` (default): one DANN training step of a preset as the trainer runs it -- next batch
from the real source and target loaders (decode, augment, collate), forward of the
concatenated batch, backward, SGD step -- for BN and BIN, in several variants named
`{nocache|cache}-{nchw|cl}-w{workers}`:
  nocache / cache   DomainDataset decoded-image cache off (cache_bytes=0) / on (filled by one
                    untimed pass over the datasets before timing, i.e. the steady state);
  nchw / cl         model and batches in contiguous (NCHW) or channels_last memory format;
  w{N}              DataLoader worker processes per loader.
After a warm-up, blocks of `--block` consecutive steps are timed, interleaved over variants
(v1, v2, ..., v1, v2, ...), so load from other processes hits all alike; a block's time per
step is reported as median and min over `--reps` blocks, with the ratio to the first variant.
Blocks rather than single steps: with workers, a loader prefetches while other variants run.

`layouts`: a BN training step (source-only: forward, cross-entropy, backward, SGD) of each
backbone on a fixed random batch, NCHW versus channels_last, interleaved single steps.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_presets.py steps \
        --pacs-root ../shared/data/pacs --pretrained ../shared/weights/mobilenet_v2_imagenet_features.pth
    PYTHONPATH=. .venv/bin/python benchmarks/bench_presets.py layouts --reps 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from domadapt.config import make_config
from domadapt.data import DomainDataset, InfiniteLoader
from domadapt.methods import build_method
from domadapt.models import build_model
from domadapt.nn import build_sgd
from domadapt.train import build_data, resolve_config

TASKS = {"pacs-cpu": ("art_painting", "sketch"), "styledigits": ("gray", "sketch")}


@dataclass
class Variant:
    cache: bool
    channels_last: bool
    workers: int

    @classmethod
    def parse(cls, text: str) -> Variant:
        cache, layout, workers = text.split("-")
        if cache not in ("cache", "nocache") or layout not in ("nchw", "cl") or workers[0] != "w":
            raise SystemExit(f"bad variant {text!r}: expected {{nocache|cache}}-{{nchw|cl}}-wN")
        return cls(cache == "cache", layout == "cl", int(workers[1:]))

    def __str__(self) -> str:
        layout = "cl" if self.channels_last else "nchw"
        return f"{'cache' if self.cache else 'nocache'}-{layout}-w{self.workers}"


@dataclass
class Setup:
    step: Callable[[], None]
    fill_seconds: float  # untimed pass that filled the caches (0 without cache)
    close: Callable[[], None]


def build_setup(preset: str, norm: str, variant: Variant, *, root: str | None,
                pretrained: str | None, batch_size: int | None = None) -> Setup:
    """One DANN training step of `preset` as the trainer runs it.

    The only place that knows the library's training API: make_config, resolve_config,
    build_data (RunData.train), build_model, build_method, build_sgd, InfiniteLoader.
    """
    source, target = TASKS[preset]
    cfg = resolve_config(make_config(
        preset, method="dann", norm=norm, root=root, pretrained=pretrained, source=source,
        target=target, num_workers=variant.workers, batch_size=batch_size))
    data = build_data(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, build_model(cfg, len(data.classes)))
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    method.to(memory_format=fmt)
    optimizer = build_sgd(
        method.model.backbone, method.heads(), lr=cfg.lr, momentum=cfg.momentum,
        nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
        backbone_lr_mult=cfg.backbone_lr_mult, gate_lr_mult=cfg.gate_lr_mult)
    budget = None if variant.cache else 0
    datasets = {k: DomainDataset(ds.items, ds.transform, cache_bytes=budget)
                for k, ds in data.train.items()}
    start = time.perf_counter()
    if variant.cache:  # in this process, before the workers fork: they inherit it
        for ds in datasets.values():
            for i in range(len(ds)):
                ds[(i, 0)]
    fill = time.perf_counter() - start if variant.cache else 0.0
    loaders = {k: InfiniteLoader(ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers)
               for k, ds in datasets.items()}

    def step() -> None:
        x_s, y_s = next(loaders["source"])
        x_t, _ = next(loaders["target"])
        loss, _ = method(x_s.contiguous(memory_format=fmt), y_s,
                         x_t.contiguous(memory_format=fmt), 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def close() -> None:
        for loader in loaders.values():
            loader.close()

    return Setup(step, fill, close)


def interleave(steps: list[Callable[[], None]], reps: int, warmup: int, block: int
               ) -> list[list[float]]:
    """Seconds per step of each of `steps`, one list per step function, blocks interleaved."""
    for _ in range(warmup):
        for fn in steps:
            fn()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(reps):
        for fn, out in zip(steps, times):
            start = time.perf_counter()
            for _ in range(block):
                fn()
            out.append((time.perf_counter() - start) / block)
    return times


def run_steps(args: argparse.Namespace) -> None:
    for preset in args.presets.split(","):
        root = args.pacs_root if preset == "pacs-cpu" else None
        pretrained = args.pretrained if preset == "pacs-cpu" else None
        workers = make_config(preset, source=TASKS[preset][0], target=TASKS[preset][1]).num_workers
        names = args.variants or (
            f"nocache-nchw-w{workers},cache-nchw-w{workers},nocache-cl-w{workers},"
            f"cache-cl-w{workers}" + ("" if workers == 0 else ",cache-cl-w0,cache-nchw-w0"))
        variants = [Variant.parse(v) for v in names.split(",")]
        for norm in args.norms.split(","):
            setups = [build_setup(preset, norm, v, root=root, pretrained=pretrained)
                      for v in variants]
            times = interleave([s.step for s in setups], args.reps, args.warmup, args.block)
            for s in setups:
                s.close()
            base = statistics.median(times[0])
            print(f"\n{preset} DANN+{norm.upper()} ({args.reps} blocks of {args.block} steps, "
                  f"{torch.get_num_threads()} thread(s))")
            print("| variant | median ms/step | min ms/step | speed-up vs first | cache fill s |")
            print("|---|---|---|---|---|")
            for v, t, s in zip(variants, times, setups):
                med = statistics.median(t)
                print(f"| {v} | {1e3 * med:.1f} | {1e3 * min(t):.1f} | {base / med:.2f}x "
                      f"| {s.fill_seconds:.1f} |")


def layout_step(backbone: str, size: int, channels_last: bool, batch: int
                ) -> Callable[[], None]:
    """A BN source-only step of `backbone` on a fixed random batch (same init for both layouts)."""
    cfg = make_config(None, backbone=backbone, pretrained="none", norm="bn",
                      method="source-only", image_size=size, resize_size=size,
                      source="a", target="b")
    torch.manual_seed(0)
    model = build_model(cfg, 10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    optimizer = build_sgd(model.backbone, [model.bottleneck, model.classifier], lr=0.01,
                          momentum=0.9, nesterov=True, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g)

    def step() -> None:
        logits: Tensor = model(x)[0]
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_layouts(args: argparse.Namespace) -> None:
    print(f"\nBN training step, batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"{args.reps} interleaved reps")
    print("| backbone | px | NCHW median ms | channels_last median ms | NCHW / CL (median) "
          "| NCHW / CL (min) |")
    print("|---|---|---|---|---|---|")
    for item in args.backbones.split(","):
        backbone, size = item.split(":")
        steps = [layout_step(backbone, int(size), cl, args.batch) for cl in (False, True)]
        nchw, cl = interleave(steps, args.reps, args.warmup, 1)
        m0, m1 = statistics.median(nchw), statistics.median(cl)
        print(f"| {backbone} | {size} | {1e3 * m0:.1f} | {1e3 * m1:.1f} | {m0 / m1:.2f} "
              f"| {min(nchw) / min(cl):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    steps = sub.add_parser("steps", help="whole DANN steps of the presets")
    steps.add_argument("--presets", default="pacs-cpu,styledigits")
    steps.add_argument("--norms", default="bn,bin")
    steps.add_argument("--variants", default=None,
                       help="comma-separated {nocache|cache}-{nchw|cl}-wN; the first is the "
                            "baseline (default: the preset's workers, cache x layout, + w0)")
    steps.add_argument("--pacs-root", default="../shared/data/pacs")
    steps.add_argument("--pretrained", default=None, help="pacs-cpu: a mobilenet_v2 .pth")
    steps.add_argument("--reps", type=int, default=8)
    steps.add_argument("--block", type=int, default=4)
    steps.add_argument("--warmup", type=int, default=3)
    layouts = sub.add_parser("layouts", help="NCHW vs channels_last per backbone")
    layouts.add_argument("--backbones", default="digitnet:32,mobilenet_v2:96,resnet18:64,"
                         "resnet18:96,resnet50:64,resnet50:96")
    layouts.add_argument("--batch", type=int, default=32)
    layouts.add_argument("--reps", type=int, default=10)
    layouts.add_argument("--warmup", type=int, default=2)
    for p in (steps, layouts):
        p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (run_layouts if args.mode == "layouts" else run_steps)(args)


if __name__ == "__main__":
    main()
