"""Trainer, run directory contract, resume after SIGKILL / Ctrl-C, divergence, DDP, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FOREGROUND_SIGINT, REPO
from PIL import Image

from domadapt.config import make_config
from domadapt.errors import UserError
from domadapt.evaluation import predict
from domadapt.nn import BatchInstanceNorm2d
from domadapt.rundir import RunDir
from domadapt.train import NonFiniteLoss, load_trained, run

TIMING_KEYS = {"wall_seconds", "train_seconds", "images_per_second"}
CLASSES = ("bar", "column", "cross")


def _glyph(label: int, rng: np.random.Generator, size: int = 20) -> np.ndarray:
    """A class-defined shape (horizontal bar / vertical bar / cross) with positional jitter."""
    m = np.zeros((size, size))
    c = size // 2 + rng.integers(-3, 4, size=2)
    if label in (0, 2):
        m[c[0] - 2:c[0] + 2, 3:-3] = 1
    if label in (1, 2):
        m[3:-3, c[1] - 2:c[1] + 2] = 1
    return m


def _write_tree(root: Path, per_class: int = 16) -> None:
    """Two domains with the same classes: white-on-black vs. coloured-on-noise."""
    rng = np.random.default_rng(0)
    for domain in ("alpha", "beta"):
        for label, cls in enumerate(CLASSES):
            d = root / domain / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                m = _glyph(label, rng)[..., None]
                if domain == "alpha":
                    img = np.repeat(m, 3, axis=2)
                else:
                    fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, (20, 20, 3)) * 0.5
                    img = m * fg + (1 - m) * bg
                Image.fromarray((img * 255).astype(np.uint8)).save(d / f"{i}.png")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "data"
    _write_tree(root)
    return root


def _options(tree: Path, **kw) -> dict:
    base = {"dataset": "folder", "root": str(tree), "source": "alpha", "target": "beta",
            "method": "dann", "norm": "bin", "backbone": "digitnet", "pretrained": "none",
            "iters": 20, "batch_size": 8, "image_size": 16, "resize_size": 18,
            "bottleneck_dim": 16, "disc_hidden": 32, "lr": 0.05, "backbone_lr_mult": 1.0,
            "eval_every": 10, "checkpoint_every": 10, "num_workers": 0, "seed": 0}
    return base | kw


def _cli_args(opts: dict) -> list[str]:
    args = []
    for k, v in opts.items():
        if k in ("dataset", "root", "source", "target", "method", "norm", "backbone", "pretrained",
                 "iters", "batch_size", "image_size", "resize_size", "bottleneck_dim", "lr",
                 "disc_hidden",
                 "backbone_lr_mult", "eval_every", "checkpoint_every", "num_workers", "seed"):
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def _log_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv") as f:
        return [{k: v for k, v in r.items() if k != "images_per_second"} for r in csv.DictReader(f)]


# -- the run directory contract ------------------------------------------------------------------

def test_dann_bin_run_writes_the_run_directory(tree, tmp_path):
    cfg = make_config(**_options(tree))
    metrics = run(cfg, tmp_path / "r", device="cpu", quiet=True)
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert files == {"config.json", "metrics.json", "log.csv", "checkpoint.pt", "gates.csv",
                     ".lock"}  # the run held its directory's lock (`run_lock`)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == metrics
    for key in ("target_acc", "source_acc", "per_class_target_acc", "cls_loss", "domain_loss",
                "disc_acc", "mean_gate", "gate_frac_below_0.1", "iters", "wall_seconds",
                "images_per_second"):
        assert key in metrics, key
    assert metrics["iters"] == 20 and 0 <= metrics["target_acc"] <= 1
    assert set(metrics["per_class_target_acc"]) == set(CLASSES)
    assert 0 <= metrics["mean_gate"] <= 1 and metrics["domain_loss"] > 0
    # 16 source + 16 target images per iteration
    assert metrics["images_per_second"] > 0
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    assert info["config"]["source"] == "alpha" and info["key"] == cfg.key()
    assert info["runtime"]["device"] == "cpu" and info["runtime"]["torch"] == torch.__version__
    # what else the numbers depend on: the CPU's kernel set and the thread count
    assert info["runtime"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["runtime"]["threads"] == torch.get_num_threads() and info["runtime"]["cpu"]
    assert info["data"]["classes"] == list(CLASSES)
    rows = _log_rows(tmp_path / "r")
    assert [int(r["iter"]) for r in rows] == [10, 20]
    assert float(rows[-1]["target_acc"]) == pytest.approx(metrics["target_acc"])
    assert float(rows[0]["lr"]) > float(rows[1]["lr"])  # annealed: lr0 (1 + 10 p)^-0.75

    # the checkpoint's model reproduces the reported (last-iteration) accuracy
    cfg2, model = load_trained(tmp_path / "r")
    assert cfg2 == cfg.replace(root=str(tree.absolute()))
    from domadapt.train import build_data
    data = build_data(cfg2)
    preds, labels = predict(model, data.evals["target"], batch_size=16, num_workers=0,
                            device=torch.device("cpu"))
    assert float((preds == labels).float().mean()) == pytest.approx(metrics["target_acc"])
    # gates.csv: the trained gates per BIN layer, in network order; its channel-weighted mean
    # is metrics.json's mean_gate
    gates = pd.read_csv(tmp_path / "r" / "gates.csv")
    layers = [n for n, m in model.named_modules() if isinstance(m, BatchInstanceNorm2d)]
    assert gates["layer"].tolist() == layers and gates["channels"].min() > 0
    weighted = (gates["mean"] * gates["channels"]).sum() / gates["channels"].sum()
    assert weighted == pytest.approx(metrics["mean_gate"], abs=1e-6)


def test_finished_run_is_not_retrained_and_other_configs_are_refused(tree, tmp_path):
    cfg = make_config(**_options(tree, method="source-only", norm="bn", iters=10))
    first = run(cfg, tmp_path / "r", device="cpu", quiet=True)
    assert "domain_loss" not in first and "mean_gate" not in first  # DANN / BIN only
    stamp = (tmp_path / "r" / "checkpoint.pt").stat().st_mtime_ns
    again = run(cfg.replace(eval_every=5), tmp_path / "r", device="cpu", quiet=True)
    assert again == first
    assert (tmp_path / "r" / "checkpoint.pt").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="different run.*lr"):
        run(cfg.replace(lr=0.1), tmp_path / "r", device="cpu", quiet=True)
    # killed after the final checkpoint, before metrics.json: finishes without training
    (tmp_path / "r" / "metrics.json").unlink()
    assert run(cfg, tmp_path / "r", device="cpu", quiet=True) == first
    assert (tmp_path / "r" / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_training_learns_and_does_not_touch_the_callers_rng(tree, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    metrics = run(make_config(**_options(tree, method="source-only", iters=60, eval_every=60)),
                  tmp_path / "r", device="cpu", quiet=True)
    assert torch.equal(torch.rand(3), expected)
    assert metrics["source_acc"] > 0.9  # the three shapes are easy on the source domain


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tree, tmp_path, run_cli):
    opts = _options(tree, lr=1e12, iters=50, checkpoint_every=1, eval_every=1)
    with pytest.raises(NonFiniteLoss, match="diverged: the (loss|weights) became non-finite"):
        run(make_config(**opts), tmp_path / "r", device="cpu", quiet=True)
    ckpt = RunDir(tmp_path / "r").read_checkpoint()
    assert 0 < ckpt["state"]["iteration"] < 50
    assert all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())
    assert not (tmp_path / "r" / "metrics.json").exists()
    code, _out, err = run_cli("train", *_cli_args(opts), "--out", tmp_path / "r", "--quiet")
    assert code != 0 and err.startswith("error: training diverged") and err.count("\n") == 1


# -- resume: killed or interrupted runs end with the same numbers -------------------------------

def _start(args: list[str]) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    code = FOREGROUND_SIGINT + "from cli.main import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, "train", *args, "--quiet",
                             "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> tuple[list[str], Path]:
    """An uninterrupted DANN+BIN run, launched exactly like the interrupted ones."""
    args = _cli_args(_options(tree, iters=120, eval_every=30, checkpoint_every=10))
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _start([*args, "--out", str(out)])
    assert proc.wait(timeout=300) == 0, proc.communicate()
    return args, out


def test_sigkill_then_resume_gives_identical_metrics(reference, tmp_path):
    args, ref = reference
    out = tmp_path / "run"
    proc = _start([*args, "--out", str(out)])
    _wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "killed too late to test anything"
    killed_at = RunDir(out).read_checkpoint()["state"]["iteration"]
    assert 0 < killed_at < 120
    proc = _start([*args, "--out", str(out)])
    assert proc.wait(timeout=300) == 0, proc.communicate()
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert _numbers(a) == _numbers(b)
    assert _log_rows(ref) == _log_rows(out)
    # config.json keeps the first start and records the resume as an event
    info = json.loads((out / "config.json").read_text())
    assert info["runtime"]["iteration"] == 0
    assert [e["iteration"] for e in info["resumes"]] == [killed_at]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_kill_leaves_a_resumable_run(reference, tmp_path, signum):
    """Ctrl-C and `kill` (Slurm's stop signal too): checkpoint, one line, exit 130, resume."""
    args, ref = reference
    out = tmp_path / "run"
    proc = _start([*args, "--out", str(out)])
    _wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().count("\n") == 0 and "interrupted" in err
    assert not (out / "metrics.json").exists()
    proc = _start([*args, "--out", str(out)])
    assert proc.wait(timeout=300) == 0, proc.communicate()
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert _numbers(a) == _numbers(b)


def test_ddp_two_processes_on_cpu(tree, tmp_path):
    """torchrun, gloo, 2 ranks x 4 images per domain = the single-process batch of 8."""
    out = tmp_path / "ddp"
    args = _cli_args(_options(tree, iters=30, eval_every=15, checkpoint_every=15))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cli", "train", *args, "--out", str(out), "--quiet", "--device", "cpu"],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("target accuracy") == 1  # printed by rank 0 only
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iters"] == 30
    assert [int(r["iter"]) for r in _log_rows(out)] == [15, 30]
    ckpt = RunDir(out).read_checkpoint()
    assert len(ckpt["ranks"]) == 2  # each rank's loader position, for resuming
    single = run(make_config(**_options(tree, iters=30, eval_every=15)), tmp_path / "single",
                 device="cpu", quiet=True)
    # same recipe, same global batch: comparable (not identical: BN statistics per rank)
    assert metrics["source_acc"] > 0.6 and single["source_acc"] > 0.6


# -- CLI ---------------------------------------------------------------------------------------

def test_cli_train_and_multidomain(tree, tmp_path, run_cli):
    opts = _options(tree, iters=10)
    code, out, err = run_cli("train", *_cli_args(opts), "--out", tmp_path / "t", "--quiet")
    assert code == 0, err
    assert "target accuracy" in out
    md = {k: v for k, v in opts.items() if k not in ("source", "target", "method", "disc_hidden")}
    code, out, err = run_cli("multidomain", *_cli_args(md), "--out", tmp_path / "m", "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(metrics["domain_acc"]) == {"alpha", "beta"}
    assert metrics["avg_acc"] == pytest.approx(np.mean(list(metrics["domain_acc"].values())))
    assert metrics["target_acc"] == metrics["avg_acc"] and "average" in out
    assert metrics["source_acc"] is None and set(metrics["per_class_target_acc"]) == set(CLASSES)
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    assert info["config"]["setting"] == "multidomain" and info["config"]["method"] == "source-only"


@pytest.mark.parametrize("change,expect", [
    ({"norm": "layer"}, "norm"),
    ({"target": "gamma"}, "gamma"),
    ({"root": "/nonexistent/data"}, "/nonexistent/data"),
    ({"pretrained": "/nonexistent/w.pth"}, "/nonexistent/w.pth"),
    ({"iters": 0}, "--iters"),
    ({"source": "beta", "target": "B"}, "same domain"),
])
def test_cli_bad_options_end_in_one_line(tree, tmp_path, run_cli, change, expect):
    code, _out, err = run_cli("train", *_cli_args(_options(tree) | change), "--out", tmp_path / "r")
    assert code != 0
    assert err.startswith("error:") and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
