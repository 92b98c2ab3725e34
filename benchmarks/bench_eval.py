"""What one evaluation of the PACS grid costs (issue #24 item 4), before and after making it
cheaper, measured side by side in one run; also checks that both give the same numbers.

    .venv/bin/python benchmarks/bench_eval.py [--reps 3] [--task A,C] [--norm bin]

One evaluation = the forward passes over the source training split, the target, the source
hold-out, AdaBN's statistics pass and its adapted pass over the target, plus the validators.
"before" re-creates the two costs removed: DataLoader worker processes for every evaluation
pass on CPU (--num-workers 2: each pass decodes every image again) and AdaBN moments taken
with out-of-place float64 ops (5 full-size passes); "after" is the code as it is. The model
is the ImageNet-pretrained MobileNetV2 with fresh heads (grid settings: pacs-cpu preset,
--source-val-fraction 0.1 --adabn), one torch thread. Prints the seconds of every
evaluation, the medians and their ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from tempfile import TemporaryDirectory
from unittest import mock

import torch

from domadapt.config import RunConfig, preset_overrides
from domadapt.distributed import distributed_context
from domadapt.engine import Trainer
from domadapt.nn import adabn
from domadapt.rundir import RunDir
from domadapt.train import build_data, resolve_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _moments_out_of_place(self: adabn._Moments, x: torch.Tensor) -> None:
    """The update as it was: the same float64 math with a new tensor per op."""
    dims = [0, *range(2, x.dim())]
    x = x.detach().double()
    n = x.numel() // x.size(1)
    mean = x.mean(dims)
    self.merge(n, mean, (x - mean.view(1, -1, *[1] * (x.dim() - 2))).square().sum(dims))


@contextlib.contextmanager
def before(trainer: Trainer) -> Iterator[None]:
    with mock.patch.object(adabn._Moments, "update", _moments_out_of_place), \
            mock.patch.object(Trainer, "eval_workers", trainer.cfg.num_workers):
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--task", default="A,C", help="source,target (short names)")
    ap.add_argument("--norm", default="bin")
    args = ap.parse_args()
    torch.set_num_threads(1)
    source, target = args.task.split(",")
    cfg = resolve_config(RunConfig(**{
        **preset_overrides("pacs-cpu"), "root": str(SHARED / "data" / "pacs"),
        "source": source, "target": target, "norm": args.norm,
        "pretrained": str(SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"),
        "iters": 1500, "eval_every": 300, "source_val_fraction": 0.1, "adabn": True}))
    seconds: dict[str, list[float]] = {"before": [], "after": []}
    rows: dict[str, dict] = {}
    for variant in ("before", "after"):  # fresh data objects: each variant starts cold
        data = build_data(cfg)
        with TemporaryDirectory() as tmp, distributed_context("cpu") as ctx:
            trainer = Trainer(cfg, data, RunDir(Path(tmp)), ctx, quiet=True)
            with before(trainer) if variant == "before" else contextlib.nullcontext():
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    rows[variant] = trainer._log_row(trainer.evaluate())
                    seconds[variant].append(time.perf_counter() - t0)
        print(f"{variant:6s} " + " ".join(f"{s:6.1f}" for s in seconds[variant]) + " s")
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"{cfg.source}->{cfg.target} {args.norm}: median of {args.reps} evaluations: before "
          f"{med['before']:.1f} s, after {med['after']:.1f} s, after/before "
          f"{med['after'] / med['before']:.2f}")
    same = all(repr(rows["before"][k]) == repr(rows["after"][k]) for k in rows["after"]
               if k != "images_per_second")
    print("logged numbers identical:", same)


if __name__ == "__main__":
    main()
