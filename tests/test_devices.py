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
from domadapt.nn import bin as bin_module
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
    assert bin_module._c_library_for(x) is None
