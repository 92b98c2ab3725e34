"""Office-Home presets (ResNet-50 from ImageNet weights, the RunConfig defaults otherwise)."""

from __future__ import annotations

from domadapt.presets.base import register_preset

# Transfer-Learning-Library's DANN on Office-Home (examples/domain_adaptation/
# image_classification/dann.py + dann.sh; docs/recipe-research.md has every source line):
# 30 epochs x 1000 iterations, iteration-based lr and GRL schedules, square 256 resize
# (bicubic) + RandomResizedCrop(224, scale (0.08, 1)), fp32, an evaluation every 1000.
register_preset("officehome", {
    "iters": 30000, "lr_schedule": "iteration", "lr_gamma": 0.001, "lr_decay": 0.75,
    "grl_schedule": "iteration", "grl_warmup": 1000.0, "resize_mode": "square",
    "interpolation": "bicubic", "crop_scale_min": 0.08, "crop_scale_max": 1.0,
    "amp": False, "channels_last": False, "eval_every": 1000, "checkpoint_every": 1000,
})

# The same network with Ganin et al.'s progress-based schedules over 5000 iterations
# (the RunConfig defaults).
register_preset("officehome-ganin", {})
