"""Device resolution: cpu, cuda, mps (Apple GPUs; mocked where there is none), and what each
implies (AMP, layout, sweep workers, the BIN kernel)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from domadapt.backbones.base import use_channels_last
from domadapt.distributed import distributed_context, resolve_device
from domadapt.engine import autocast_dtype
from domadapt.errors import UserError
from domadapt.nn import bin_kernel as kernels
from domadapt.provenance import hardware
from domadapt.sweep import LocalLauncher, make_launcher


@pytest.fixture
def mps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with an Apple GPU and no CUDA."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_mps_when_available(mps: None) -> None:
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("auto") == torch.device("cpu")  # MPS only when asked for
    mps_dev = torch.device("mps")
    assert autocast_dtype(mps_dev) is None  # float32: no autocast, no GradScaler
    assert not use_channels_last("mobilenet_v2", "mps", None)  # NCHW unless asked
    assert use_channels_last("mobilenet_v2", "mps", True)
    assert hardware(mps_dev)["gpu"] == "Apple GPU (MPS)"
    assert isinstance(make_launcher("local", workers=None, device="mps", sweep_dir=Path(".")),
                      LocalLauncher)  # one GPU: one worker


def test_mps_refuses_torchrun(mps: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="one process only"), distributed_context("mps"):
        pass


def test_mps_unavailable_is_one_line(monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"no Apple GPU \(MPS\) on this machine"):
        resolve_device("mps")
    code, _, err = run_cli("train", "--dataset", "styledigits", "--source", "gray",
                             "--target", "color", "--device", "mps", "--out", "/nonexistent/x")
    assert code == 1 and err.strip().splitlines() == [
        "error: --device mps: no Apple GPU (MPS) on this machine; use --device cpu"]
    with pytest.raises(UserError, match=re.escape("use auto | cpu | cuda | mps")):
        resolve_device("xpu")


def test_bin_off_cpu_takes_the_torch_path() -> None:
    """The C kernels are CPU-only: a tensor on any other device (MPS, CUDA) gets torch ops."""
    x = torch.empty(2, 3, 4, 4, device="meta")
    assert kernels.c_library_for(x) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_with_amp_and_channels_last(tmp_path: Path) -> None:
    """A short DANN + BIN run on CUDA: AMP, channels_last, BIN's torch path; it finishes with
    finite numbers and records what ran."""
    import json
    import math

    from test_train import _options, _write_tree

    from domadapt.config import make_config
    from domadapt.train import run

    _write_tree(tmp_path / "data", per_class=6)
    cfg = make_config(**_options(tmp_path / "data", iters=6, eval_every=3, checkpoint_every=3,
                                 amp=True))
    metrics = run(cfg, tmp_path / "r", device="cuda", quiet=True)
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    assert info["runtime"]["device"].startswith("cuda")
    assert info["runtime"]["memory_format"] == "channels_last"
    assert info["provenance"]["bin_kernel"] == {"kernel": "torch", "reason": "on cuda"}
    assert math.isfinite(metrics["target_acc"]) and info["runtime"]["gpu"]


def test_gpu_check_plan() -> None:
    """What `make gpu-check` runs on a CUDA machine: the CUDA tests, the BIN benchmark in fp32
    and bf16, a 200-iteration DANN + BIN run with AMP on CUDA, eager and compiled; at most 10
    minutes."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    out = Path("benchmarks/gpu/x")
    plan = {s.name: s.argv for s in gpu_check.steps(out)}
    assert "cuda" in plan["cuda-tests"] and "tests/test_devices.py" in plan["cuda-tests"]
    for dtype in ("float32", "bfloat16"):
        argv = plan[f"bench-{dtype}"]
        assert argv[argv.index("--dtype") + 1] == dtype and "cuda" in argv
    train = plan["dann-bin-amp-200"]
    for flag, value in (("--iters", "200"), ("--method", "dann"), ("--norm", "bin"),
                        ("--device", "cuda"), ("--preset", "pacs-cpu"),
                        ("--out", str(out / "run"))):
        assert train[train.index(flag) + 1] == value
    assert "--amp" in train
    compiled = plan["dann-bin-amp-compile-200"]  # the same run under --compile, beside it
    assert compiled[-1] == "--compile" and compiled[compiled.index("--out") + 1] == str(
        out / "run-compiled") and compiled[:compiled.index("--out")] == train[:train.index("--out")]
    assert sum(s.timeout for s in gpu_check.steps(out)) <= 600
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_gpu_check_without_cuda_prints_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout == "gpu-check: skipped, no CUDA device\n"
