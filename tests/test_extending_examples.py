"""docs/extending.md's worked examples train from the CLI as they are written: each `# file:`
block is copied into a fresh copy of the package (nothing else edited), and a tiny styledigits
run with the example's option is trained through `domadapt train` in a child process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

GUIDE = REPO / "docs" / "extending.md"
EXAMPLE = re.compile(r"```python\n# file: (\S+)\n(.*?)```", re.DOTALL)
# path -> the train options that use it, and a statistic or record it must leave in metrics.json
RUNS = {
    "domadapt/methods/entmin.py": (["--method", "entmin", "--entmin-weight", "0.2"],
                                   "target_entropy"),
    "domadapt/methods/twostep.py": (["--method", "twostep", "--twostep-weight", "0.2"],
                                    "target_entropy"),
    "domadapt/norms/groupnorm.py": (["--method", "source-only", "--norm", "gn", "--gn-groups",
                                     "4"], "target_acc"),
}


def examples() -> dict[str, str]:
    return {path: code for path, code in EXAMPLE.findall(GUIDE.read_text())}


def test_every_example_of_the_guide_is_trained_here():
    assert set(examples()) == set(RUNS)


@pytest.mark.parametrize("path", sorted(RUNS))
def test_example_trains_from_the_cli(path, tmp_path):
    code = examples()[path]
    tree = tmp_path / "pkg"
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    for package in ("domadapt", "cli"):
        shutil.copytree(REPO / package, tree / package, ignore=ignore)
    target = tree / path
    assert not target.exists()  # a new file, not an edit
    target.write_text(code)
    options, stat = RUNS[path]
    out = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from cli.main import main; main(sys.argv[1:])",
         "train", "--preset", "styledigits", "--source", "color", "--target", "gray",
         "--iters", "2", "--eval-every", "2", "--checkpoint-every", "2", "--batch-size", "8",
         "--eval-max-images", "40", "--quiet", "--out", str(out), *options],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())["config"]
    name, value = options[-2].removeprefix("--").replace("-", "_"), options[-1]
    assert str(config["method_options"].get(name, config["norm_options"].get(name))) == value
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[stat] == metrics[stat]  # present and not NaN
    if "owns_update = True" in code:  # each of its optimizers is checkpointed
        import torch

        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert set(state["optimizers"]) == {"features", "classifier"}
