"""`timm:<name>`: any timm model (optional extra: `pip install 'domadapt[timm]'`), built with
`num_classes=0` so it returns pooled features of `num_features`. Its BatchNormAct2d layers keep
their activation when converted (see `domadapt.norms.convert_norm`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from domadapt.backbones.base import (
    DOWNLOAD_TIMEOUT_S,
    download_failed,
    load_state_dict,
    read_state_dict,
    register_family,
    socket_timeout,
)
from domadapt.errors import UserError


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError("--backbone timm:<name> needs the optional timm package: "
                        "pip install 'domadapt[timm]'") from None
    return timm


def build_timm(name: str, pretrained: str) -> tuple[nn.Module, int]:
    timm = _timm()
    if name not in timm.list_models():
        raise UserError(f"unknown timm model {name!r} (see timm.list_models())")
    if pretrained == "imagenet":
        try:
            with socket_timeout(DOWNLOAD_TIMEOUT_S):
                net = timm.create_model(name, pretrained=True, num_classes=0)
        except (OSError, RuntimeError) as e:
            raise download_failed(f"timm:{name}", e) from None
    else:
        net = timm.create_model(name, pretrained=False, num_classes=0)
        if pretrained != "none":
            load_state_dict(net, read_state_dict(Path(pretrained)), pretrained,
                            optional=("fc.", "classifier.", "head."))
    return net, int(net.num_features)


register_family("timm", build_timm)
