"""PACS on a CPU: MobileNetV2 at 96 pixels, 300 iterations."""

from __future__ import annotations

from domadapt.presets.base import register_preset

register_preset("pacs-cpu", {
    "dataset": "pacs", "backbone": "mobilenet_v2", "image_size": 96, "resize_size": 112,
    "iters": 300, "batch_size": 32, "eval_every": 100, "checkpoint_every": 100,
})
