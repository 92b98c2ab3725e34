"""Backbones as plug-ins: a name maps to a builder `(pretrained) -> (headless module, feature_dim)`.

`pretrained` is "imagenet" (the library's own weights, downloaded once), "none" (random init)
or a path to a state dict. The module maps images to flat feature vectors of `feature_dim`.
Exact names live in `BACKBONES`; a family with a prefix (`timm:<name>`) registers a resolver.
Registering a name or a prefix twice is an error.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from domadapt.errors import UserError
from domadapt.registry import Registry

Builder = Callable[[str], tuple[nn.Module, int]]
FamilyBuilder = Callable[[str, str], tuple[nn.Module, int]]  # (name after the prefix, pretrained)

BACKBONES: Registry[Builder] = Registry("backbone")
FAMILIES: Registry[FamilyBuilder] = Registry("backbone family")
CPU_CHANNELS_LAST: set[str] = set()  # backbones whose CPU training step is faster in NHWC
MIN_IMAGE_SIZE: dict[str, int] = {}  # the smallest input a backbone can take (default 1)
DOWNLOAD_TIMEOUT_S = 60.0


def register_backbone(name: str, builder: Builder, *, cpu_channels_last: bool = False,
                      min_image_size: int = 1) -> Builder:
    """Register `builder` under `name`; `cpu_channels_last`: its CPU training step was measured
    faster in the channels_last layout (`benchmarks/bench_presets.py layouts`);
    `min_image_size`: smaller crops shrink to nothing inside it (`check_image_size`)."""
    if cpu_channels_last:
        CPU_CHANNELS_LAST.add(name)
    if min_image_size > 1:
        MIN_IMAGE_SIZE[name] = min_image_size
    return BACKBONES.register(name, builder)


def check_image_size(name: str, image_size: int) -> None:
    """UserError (one line) when `image_size` is below what backbone `name` can take."""
    if image_size < (least := MIN_IMAGE_SIZE.get(name, 1)):
        raise UserError(f"--image-size {image_size} is too small for the {name} backbone (at "
                        f"least {least} pixels)")


def use_channels_last(backbone: str, device_type: str, requested: bool | None) -> bool:
    """The memory layout of a run: `requested` if given, else channels_last on CUDA and, on
    CPU, for the backbones registered as faster in it; NCHW elsewhere (MPS: not measured)."""
    if requested is not None:
        return requested
    return device_type == "cuda" or (device_type == "cpu" and backbone in CPU_CHANNELS_LAST)


def register_family(prefix: str, builder: FamilyBuilder) -> FamilyBuilder:
    """`prefix:<name>` backbones, e.g. `timm:resnet50d`."""
    return FAMILIES.register(prefix, builder)


def is_backbone(name: str) -> bool:
    prefix, sep, _ = name.partition(":")
    return name in BACKBONES or (bool(sep) and prefix in FAMILIES)


def check_backbone(name: str) -> None:
    """UserError (one line) unless `name` is a registered backbone or `<family>:<name>`."""
    if not is_backbone(name):
        shown = ", ".join(n for n in BACKBONES.names() if not _is_variant(n))
        families = ", ".join(f"{p}:<name>" for p in FAMILIES.names())
        raise UserError(f"unknown backbone {name!r}; choose from {shown}, ... (`domadapt "
                        f"backbones` lists all){f', or {families}' if families else ''}")


def _is_variant(name: str) -> bool:
    """Hide the long tail (e.g. regnet_y_3_2gf) from one-line error messages."""
    return name.count("_") > 1


def build_backbone(name: str, pretrained: str = "none") -> tuple[nn.Module, int]:
    """Headless backbone `name` and its feature dimension."""
    check_backbone(name)
    prefix, sep, rest = name.partition(":")
    if sep and prefix in FAMILIES:
        return FAMILIES.get(prefix)(rest, pretrained)
    return BACKBONES.get(name)(pretrained)


# -- weights ------------------------------------------------------------------------------------

@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub opens URLs without a timeout; bound it so an unreachable host fails, not hangs."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download_failed(name: str, error: Exception) -> UserError:
    return UserError(f"--pretrained imagenet: could not download the {name} ImageNet weights "
                     f"({error}); if offline, pass --pretrained PATH to a state dict")


def download_state_dict(weights: Any, name: str) -> dict[str, Tensor]:
    """torchvision `weights.get_state_dict` (cached in $TORCH_HOME), bounded in time; a failed
    download is one UserError line that says what to do offline."""
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError, timeouts, hash mismatch, truncated file
        raise download_failed(name, e) from None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"--pretrained {path}: no such file (use imagenet, none or a PATH)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for a corrupt file)
        raise UserError(f"--pretrained {path}: not a readable torch state dict "
                        f"({type(e).__name__})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError(f"--pretrained {path}: expected a state dict (name -> tensor)")
    return sd


def load_state_dict(net: nn.Module, sd: dict[str, Any], origin: str,
                    optional: tuple[str, ...] = ()) -> None:
    """Load `sd` into `net`: every key must match, except missing keys under `optional`."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(optional)]
    unexpected = [k for k in sd if k not in own]
    wrong_shape = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise UserError(f"--pretrained {origin}: does not fit {type(net).__name__}; "
                        + "; ".join(problems))
    net.load_state_dict(sd, strict=False)
