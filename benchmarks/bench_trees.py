"""The same job in two source trees, side by side in one run (not a test).

For speed claims against an older release: check the old commit out beside this one
(`git worktree add ../old df5e250`), then

    .venv/bin/python benchmarks/bench_trees.py --old ../old --job demo --reps 1
    .venv/bin/python benchmarks/bench_trees.py --old ../old --job pacs --reps 1 \
        --pacs-root ../shared/data/pacs --pretrained ../shared/weights/mobilenet_v2_imagenet_features.pth

Jobs (each tree runs its own code through its own CLI entry, `python -m cli` or the first
release's `python -m domadapt`, with this interpreter, PYTHONPATH = the tree, cwd = the tree):
  demo   `make demo`'s sweep (styledigits, 12 tasks x {source-only, DANN} x {BN, BIN} + the
         multi-domain runs, seed 0, default workers) into a fresh folder: wall-clock seconds
         of the whole command.
  pacs   one `pacs-cpu` DANN + BIN training run (art_painting -> sketch, seed 0, 300
         iterations): the run's `train_seconds` (training steps only, evaluations excluded)
         from its metrics.json, and the wall-clock seconds of the command.
Before timing, each tree runs one untimed 1-iteration styledigits job (generates the embedded
dataset if needed, compiles the BIN kernel), so neither side pays a one-time cost. The reps
run in ABBA order (old, new, new, old, ...) so a drift in machine load hits both alike; the
script prints every timing, the medians and new / old ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = ["sweep", "--dataset", "styledigits", "--preset", "styledigits", "--tasks", "all",
        "--methods", "source-only,dann", "--norms", "bn,bin", "--seeds", "0", "--multidomain",
        "--quiet"]


def entry(tree: Path) -> list[str]:
    """The CLI entry of a source tree: `-m cli` (current) or `-m domadapt` (first release)."""
    module = "cli" if (tree / "cli" / "__main__.py").is_file() else "domadapt"
    return [sys.executable, "-m", module]


def run(tree: Path, args: list[str]) -> float:
    """Run the tree's CLI with `args`; wall-clock seconds. Exits on failure."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    done = subprocess.run([*entry(tree), *args], cwd=tree, env=env, capture_output=True,
                          text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{tree}: {' '.join(args[:2])} failed ({done.returncode}): "
                 f"{done.stderr.strip().splitlines()[-1:]}")
    return seconds


def job(name: str, tree: Path, out: Path, opts: argparse.Namespace) -> dict[str, float]:
    if name == "demo":
        return {"wall_s": run(tree, [*DEMO, "--out", str(out)])}
    args = ["train", "--dataset", "pacs", "--root", opts.pacs_root, "--preset", "pacs-cpu",
            "--pretrained", opts.pretrained, "--source", "art_painting", "--target", "sketch",
            "--method", "dann", "--norm", "bin", "--seed", "0", "--out", str(out)]
    wall = run(tree, args)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"train_s": metrics["train_seconds"], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="the older source tree")
    p.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1])
    p.add_argument("--job", choices=("demo", "pacs"), required=True)
    p.add_argument("--reps", type=int, default=1, help="pairs (ABBA order)")
    p.add_argument("--pacs-root", default="../shared/data/pacs")
    p.add_argument("--pretrained", default="../shared/weights/mobilenet_v2_imagenet_features.pth")
    opts = p.parse_args()
    trees = {"old": opts.old.resolve(), "new": opts.new.resolve()}
    times: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="bench_trees_") as tmp:
        for side, tree in trees.items():  # untimed warm-up
            run(tree, ["train", "--dataset", "styledigits", "--preset", "styledigits",
                       "--source", "gray", "--target", "color", "--iters", "1",
                       "--eval-every", "1", "--out", f"{tmp}/warm-{side}"])
        order = [s for r in range(opts.reps) for s in (("old", "new") if r % 2 == 0
                                                       else ("new", "old"))]
        for i, side in enumerate(order):
            t = job(opts.job, trees[side], Path(tmp) / f"{opts.job}-{side}-{i}", opts)
            times[side].append(t)
            print(f"{opts.job} {side:3s} ({trees[side]}): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), flush=True)
    for key in times["old"][0]:
        old = statistics.median(t[key] for t in times["old"])
        new = statistics.median(t[key] for t in times["new"])
        print(f"{opts.job} {key}: old {old:.1f} s, new {new:.1f} s, "
              f"speed-up old / new = {old / new:.2f}x (medians of {opts.reps})")


if __name__ == "__main__":
    main()
