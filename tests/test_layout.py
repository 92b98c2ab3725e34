"""The memory layout: channels_last by default where it is faster (CUDA; on CPU per backbone),
`--channels-last/--no-channels-last` overrides, recorded in config.json, reproducible."""

from __future__ import annotations

import json

import pytest

from domadapt.backbones.base import use_channels_last
from domadapt.config import make_config
from domadapt.train import run

TIMING = {"wall_seconds", "train_seconds", "images_per_second"}


def test_auto_layout_per_device_and_backbone():
    assert use_channels_last("resnet18", "cuda", None)
    assert use_channels_last("digitnet", "cpu", None) and use_channels_last("mobilenet_v2", "cpu", None)
    assert not use_channels_last("resnet18", "cpu", None)  # measured slower there
    assert not use_channels_last("digitnet", "cpu", False) and use_channels_last("resnet18", "cpu", True)


@pytest.mark.parametrize(("requested", "recorded"), [(None, "channels_last"), (False, "NCHW")])
def test_layout_is_recorded_and_runs_repeat_exactly(tmp_path, requested, recorded):
    cfg = make_config("styledigits", source="gray", target="color", norm="bin", iters=3,
                      eval_every=3, checkpoint_every=3, batch_size=8, channels_last=requested)
    first = run(cfg, tmp_path / "a", device="cpu", quiet=True)
    again = run(cfg, tmp_path / "b", device="cpu", quiet=True)
    info = json.loads((tmp_path / "a" / "config.json").read_text())
    assert info["runtime"]["memory_format"] == recorded
    assert {k: v for k, v in first.items() if k not in TIMING} == \
        {k: v for k, v in again.items() if k not in TIMING}
