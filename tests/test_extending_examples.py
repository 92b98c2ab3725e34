"""docs/extending.md's worked examples work as they are written: each `# file:` block is copied
into a fresh copy of the package (nothing else edited) and used from the CLI in a child
process: a method or norm trains a tiny styledigits run with its option, a validator is a
log.csv column of a sweep and selects its tables, a dataset trains on a tiny tree of its
domains and classes, a launcher runs a sweep."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

GUIDE = REPO / "docs" / "extending.md"
EXAMPLE = re.compile(r"```python\n# file: (\S+)\n(.*?)```", re.DOTALL)
TINY = ["--preset", "styledigits", "--iters", "2", "--eval-every", "2", "--checkpoint-every",
        "2", "--batch-size", "8", "--eval-max-images", "40", "--quiet"]
# path -> the train options that use it, and a statistic it must leave in metrics.json
RUNS = {
    "domadapt/methods/entmin.py": (["--method", "entmin", "--entmin-weight", "0.2"],
                                   "target_entropy"),
    "domadapt/methods/twostep.py": (["--method", "twostep", "--twostep-weight", "0.2"],
                                    "target_entropy"),
    "domadapt/norms/groupnorm.py": (["--method", "source-only", "--norm", "gn", "--gn-groups",
                                     "4"], "target_acc"),
}
LAUNCHER = "domadapt/sweep/launchers/lastfirst.py"
VALIDATOR = "domadapt/validators/im.py"
DATASET = "domadapt/data/datasets/office31.py"
BUILT_IN_VALIDATORS = ["val_source", "val_entropy", "val_snd", "val_dev"]


def examples() -> dict[str, str]:
    return {path: code for path, code in EXAMPLE.findall(GUIDE.read_text())}


def with_example(tmp_path: Path, path: str) -> Path:
    """A copy of the package with the guide's file `path` added (a new file, not an edit)."""
    tree = tmp_path / "pkg"
    for package in ("domadapt", "cli"):
        shutil.copytree(REPO / package, tree / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert not (tree / path).exists()
    (tree / path).write_text(examples()[path])
    return tree


def domadapt(tree: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from cli.main import main; main(sys.argv[1:])",
         *map(str, args)], cwd=tree, env=os.environ | {"PYTHONPATH": str(tree)},
        capture_output=True, text=True, timeout=300, check=False)


def test_every_example_of_the_guide_is_used_here():
    assert set(examples()) == {*RUNS, LAUNCHER, VALIDATOR, DATASET}


@pytest.mark.parametrize("path", sorted(RUNS))
def test_example_trains_from_the_cli(path, tmp_path):
    tree = with_example(tmp_path, path)
    options, stat = RUNS[path]
    out = tmp_path / "run"
    proc = domadapt(tree, "train", "--source", "color", "--target", "gray", *TINY, "--out", out,
                    *options)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())["config"]
    name, value = options[-2].removeprefix("--").replace("-", "_"), options[-1]
    assert str(config["method_options"].get(name, config["norm_options"].get(name))) == value
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[stat] == metrics[stat]  # present and not NaN
    if "owns_update = True" in examples()[path]:  # each of its optimizers is checkpointed
        import torch

        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert set(state["optimizers"]) == {"features", "classifier"}


def test_launcher_example_runs_a_sweep(tmp_path):
    tree = with_example(tmp_path, LAUNCHER)
    out = tmp_path / "sweep"
    grid = ["sweep", "--dataset", "styledigits", "--tasks", "color:gray", "--methods",
            "source-only", "--norms", "bn", "--seeds", "0,1", *TINY, "--launcher", "last-first"]
    proc = domadapt(tree, *grid, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = sorted((out / "runs").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime_ns)
    assert ["_s1-" in done[0].parent.name, "_s0-" in done[1].parent.name] == [True, True]
    assert (out / "runs.csv").is_file()
    refused = domadapt(tree, *grid, "--workers", "2", "--out", tmp_path / "other")
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [
        "error: --launcher last-first runs one cell at a time: no --workers, --slurm"]


def test_validator_example_is_logged_and_selects(tmp_path):
    tree = with_example(tmp_path, VALIDATOR)
    out = tmp_path / "sweep"
    at = TINY.index("--eval-every")
    tiny = [*TINY[:at], "--eval-every", "1", *TINY[at + 2:]]  # two evaluations to choose from
    proc = domadapt(tree, "sweep", "--dataset", "styledigits", "--tasks", "color:gray",
                    "--methods", "source-only", "--norms", "bn", "--seeds", "0", *tiny,
                    "--source-val-fraction", "0.2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (out / "runs").glob("*/log.csv")
    header = run.read_text().splitlines()[0].split(",")
    validators = [c for c in header if c.startswith("val_")]
    assert validators == [*BUILT_IN_VALIDATORS, "val_im"]  # the built-ins first, unchanged
    rows = run.read_text().splitlines()[1:]
    assert len(rows) == 2 and all(r.split(",")[header.index("val_im")] for r in rows)
    metrics = json.loads((run.parent / "metrics.json").read_text())
    assert metrics["val_im"] == metrics["val_im"]
    proc = domadapt(tree, "tables", out, "--select", "im")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--select im`): the evaluation with the highest information maximization" in (
        out / "comparison_select-im.md").read_text()
    rules = [line.split(",")[0] for line in (out / "selection_table.csv").read_text().splitlines()]
    assert rules[1:] == ["last", "source", "entropy", "snd", "dev", "im",
                         "oracle (uses target labels)"]
    usage = domadapt(tree, "tables", "--help").stdout
    assert "im (highest information maximization" in " ".join(usage.split())


def test_dataset_example_trains(tmp_path):
    from domadapt.data.testing import write_image_tree

    tree = with_example(tmp_path, DATASET)
    spec = domadapt(tree, "data", "list").stdout
    assert "office31" in spec and "Office-31" in spec
    code = ("import json; from domadapt.data import get_dataset; s = get_dataset('office31'); "
            "print(json.dumps([s.domain_names(None), s.classes]))")
    show = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=os.environ | {"PYTHONPATH": str(tree)}, capture_output=True, text=True,
        check=True)
    domains, classes = json.loads(show.stdout)
    root = write_image_tree(tmp_path / "office31", domains, classes, 2, size=12)
    out = tmp_path / "run"
    proc = domadapt(tree, "train", "--dataset", "office31", "--root", root, "--source", "A",
                    "--target", "W", *TINY, "--method", "dann", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["dataset"], config["source"], config["target"]) == ("office31", "amazon",
                                                                       "webcam")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_class_target_acc"]) == 31
    assert "office31" in " ".join(domadapt(tree, "train", "--help").stdout.split())
