"""RunConfig: every setting of one run, in one frozen dataclass, hashed into a run key.

Defaults follow the standard DANN Office-Home recipe (ResNet-50 pretrained on ImageNet,
bottleneck 256, SGD momentum 0.9 Nesterov, lr 0.01 with the backbone at 0.1x, weight decay
1e-3, lr(p) = lr0 (1 + 10 p)^-0.75, batch 32 source + 32 target, BIN gates at 10x).
Presets override a few fields so the same command fits a CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any

from domadapt.errors import UserError

METHODS = ("source-only", "dann")
NORMS = ("bn", "in", "bin")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "digitnet")
SETTINGS = ("transfer", "multidomain")

# Fields that do not change what a run computes: left out of the run key.
NON_KEY_FIELDS = frozenset({"root", "num_workers", "eval_every", "checkpoint_every"})


@dataclass(frozen=True)
class RunConfig:
    """Every hyper-parameter of one run. `key()` names its run directory."""

    dataset: str = "officehome"
    root: str | None = None
    setting: str = "transfer"  # "transfer" (source -> target) | "multidomain"
    source: str | None = None  # full domain name (resolved), transfer only
    target: str | None = None
    method: str = "dann"
    norm: str = "bn"
    backbone: str = "resnet50"
    pretrained: str = "imagenet"  # "imagenet" | "none" | path to a torchvision state dict
    bottleneck_dim: int = 256
    iters: int = 5000
    batch_size: int = 32  # per domain: 32 source + 32 target
    image_size: int = 224
    resize_size: int = 256
    lr: float = 0.01  # head learning rate lr0
    backbone_lr_mult: float = 0.1
    gate_lr_mult: float = 10.0  # BIN gates: 10x the learning rate of the layer they sit in
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-3
    lr_gamma: float = 10.0  # lr(p) = lr0 * (1 + lr_gamma * p) ** -lr_decay
    lr_decay: float = 0.75
    adv_weight: float = 1.0  # weight of the domain-adversarial loss (DANN)
    disc_hidden: int = 1024
    split_seed: int = 0  # multi-domain train/test split
    test_fraction: float = 0.2
    eval_every: int = 500
    checkpoint_every: int = 500
    num_workers: int = 2
    amp: bool = True  # used only on CUDA
    channels_last: bool = True  # used only on CUDA
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("setting", self.setting, SETTINGS)
        check_choice("method", self.method, METHODS)
        check_choice("norm", self.norm, NORMS)
        check_choice("backbone", self.backbone, BACKBONES)
        for name in ("iters", "batch_size", "image_size", "resize_size", "eval_every",
                     "checkpoint_every", "bottleneck_dim"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        for name in ("seed", "split_seed", "weight_decay", "backbone_lr_mult", "gate_lr_mult",
                     "adv_weight", "momentum"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.disc_hidden <= 0:
            raise UserError(f"--disc-hidden must be positive, got {self.disc_hidden}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"test fraction must lie in (0, 1), got {self.test_fraction}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.setting == "transfer" and (self.source is None or self.target is None):
            raise UserError("a transfer run needs --source and --target")
        if self.setting == "transfer" and self.source == self.target:
            raise UserError(f"source and target are the same domain: {self.source}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def key(self) -> str:
        """Short stable hash of every field that changes the result (not paths or workers)."""
        d = {k: v for k, v in self.to_dict().items() if k not in NON_KEY_FIELDS}
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def name(self) -> str:
        """Readable run name, e.g. `Art-Clipart_dann_bin_s0`."""
        task = f"{self.source}-{self.target}" if self.setting == "transfer" else "multidomain"
        method = self.method if self.setting == "transfer" else "erm"
        return f"{task}_{method}_{self.norm}_s{self.seed}"


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {option} {value!r}; choose from {', '.join(choices)}")


# Presets: named overrides of the defaults. `officehome` is the paper recipe itself.
PRESETS: dict[str, dict[str, Any]] = {
    "officehome": {},
    "pacs-cpu": {
        "dataset": "pacs", "backbone": "mobilenet_v2", "image_size": 96, "resize_size": 112, "iters": 300,
        "batch_size": 32, "eval_every": 100, "checkpoint_every": 100,
    },
    # From scratch, 300 iterations: lr 0.05 (0.01 learns too slowly), adversarial weight 0.3
    # (at 1.0 the reversed gradient swamps the untrained features and DANN+BN fails to fit
    # the source on texture->sketch / sketch->gray). One CPU core: ~15 s per DANN run,
    # ~9 s source-only, ~7 s multidomain (about half of it decoding and augmenting images).
    "styledigits": {
        "dataset": "styledigits", "backbone": "digitnet", "pretrained": "none", "image_size": 32,
        "resize_size": 36, "iters": 300, "batch_size": 32, "lr": 0.05, "backbone_lr_mult": 1.0,
        "adv_weight": 0.3, "bottleneck_dim": 128, "disc_hidden": 256, "weight_decay": 5e-4,
        "eval_every": 150, "checkpoint_every": 150, "num_workers": 0,
    },
}


def preset_overrides(name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def make_config(preset: str | None = None, **options: Any) -> RunConfig:
    """Defaults <- preset <- explicit options (None means 'not given')."""
    values = preset_overrides(preset)
    values.update({k: v for k, v in options.items() if v is not None})
    return RunConfig(**values)
