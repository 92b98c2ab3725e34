"""Retrain recorded runs and check that their metrics are unchanged (a refactor changes no result).

    python benchmarks/same_metrics.py results/styledigits-methods/runs/color-gray_dann_bn_s0-*

For each run directory: its config.json's configuration is trained afresh into a temporary
directory (CPU, quiet) and every entry of the new metrics.json except the timing and device
ones is compared with the recorded one, exactly (bit-identical floats). Prints one line per run
and exits 1 if any differs (`--changed KEY`: a metric the change is meant to alter, printed
and not counted). Training uses the recorded number of torch threads (reductions
split over more threads round differently). Bit-identity holds on the machine (CPU, torch
build, BIN kernel) that recorded the runs; elsewhere a difference may be floating-point, not
the code. The first line names the code that ran: a script's folder, not the checkout, is on
sys.path, so run it with PYTHONPATH=<checkout> unless that checkout is the one installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import domadapt
from domadapt.config import RunConfig
from domadapt.nn.bin_kernel import kernel_info
from domadapt.train import run

NOT_COMPARED = {"wall_seconds", "train_seconds", "images_per_second", "device"}


def differences(recorded: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ (a key present in one only counts as a difference)."""
    keys = (set(recorded) | set(new)) - NOT_COMPARED
    return sorted(k for k in keys if recorded.get(k, "<absent>") != new.get(k, "<absent>"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--changed", action="append", default=[], metavar="KEY",
                        help="a metric the change is meant to alter: its two values are "
                             "printed, not counted as a difference (repeatable)")
    args = parser.parse_args(argv)
    print(f"code: {Path(domadapt.__file__).parent}; BIN kernel: {kernel_info()['kernel']}")
    failed = 0
    for run_dir in args.runs:
        info = json.loads((run_dir / "config.json").read_text())
        recorded = json.loads((run_dir / "metrics.json").read_text())
        cfg = RunConfig.from_dict(info["config"])
        # the recorded thread count: reductions split over more threads round differently
        torch.set_num_threads(info.get("runtime", {}).get("threads") or torch.get_num_threads())
        with tempfile.TemporaryDirectory() as tmp:
            new = run(cfg.replace(root=None) if cfg.dataset == "styledigits" else cfg,
                      Path(tmp) / "run", device="cpu", quiet=True)
        diff = [k for k in differences(recorded, new) if k not in args.changed]
        failed += bool(diff)
        meant = "".join(f"; {k} (meant to change) {recorded.get(k)!r} -> {new.get(k)!r}"
                        for k in args.changed)
        print(f"{run_dir.name}: " + ("same metrics" if not diff else
                                     "DIFFERENT: " + ", ".join(
                                         f"{k} {recorded.get(k)!r} -> {new.get(k)!r}"
                                         for k in diff[:5])) + meant)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
