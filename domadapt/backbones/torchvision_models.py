"""Every torchvision classification model whose normalization is BatchNorm, by its torchvision
name (resnet50, resnext50_32x4d, wide_resnet50_2, densenet121, efficientnet_b0,
mobilenet_v2, mobilenet_v3_large, vgg16_bn, regnet_y_400mf, ...).

The head removed is the model's last `nn.Linear` (and a Dropout right before it): what is left
maps an image to the features the classifier saw (resnet: the pooled 2048-d map; vgg16_bn:
fc7; mobilenet_v3: its hidden layer). `--pretrained imagenet` loads torchvision's
IMAGENET1K_V1 weights where they exist (those the DANN / BIN literature used), else DEFAULT.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from pathlib import Path

import torchvision
from torch import nn

from domadapt.backbones.base import (
    download_state_dict,
    load_state_dict,
    read_state_dict,
    register_backbone,
)

# Families whose normalization is BatchNorm2d. Left out: LayerNorm models (vit, swin,
# convnext, maxvit), models without norms (alexnet, squeezenet) and those whose training
# forward returns auxiliary outputs (googlenet, inception_v3).
BN_FAMILIES = ("resnet", "resnext", "wide_resnet", "densenet", "efficientnet", "mobilenet",
               "mnasnet", "shufflenet", "regnet")


def uses_batchnorm(name: str) -> bool:
    return name.startswith(BN_FAMILIES) or (name.startswith("vgg") and name.endswith("_bn"))


def head_linear(net: nn.Module) -> str:
    """Qualified name of the classifier's output layer: the last nn.Linear of `net`."""
    return [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]


def strip_head(net: nn.Module) -> tuple[nn.Module, int]:
    """Remove the last Linear (and a Dropout just before it); return (net, its in_features)."""
    name = head_linear(net)
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    dim = parent.get_submodule(attr).in_features
    if isinstance(parent, nn.Sequential):
        kept = list(parent.named_children())
        kept = kept[:[n for n, _ in kept].index(attr)]
        if kept and isinstance(kept[-1][1], nn.Dropout):
            kept = kept[:-1]
        new = nn.Sequential(OrderedDict(kept))
        if parent_name:
            grand, _, leaf = parent_name.rpartition(".")
            setattr(net.get_submodule(grand) if grand else net, leaf, new)
        else:  # pragma: no cover - no torchvision model is a bare Sequential
            return new, dim
    else:
        setattr(parent, attr, nn.Identity())
    return net, dim


def build_torchvision(name: str, pretrained: str) -> tuple[nn.Module, int]:
    net = torchvision.models.get_model(name, weights=None)
    head = head_linear(net) + "."
    if pretrained == "imagenet":
        enum = torchvision.models.get_model_weights(name)
        weights = getattr(enum, "IMAGENET1K_V1", None) or enum.DEFAULT
        load_state_dict(net, download_state_dict(weights, name), f"imagenet ({weights})")
    elif pretrained != "none":
        # A feature-extractor state dict may lack the head (and for resnets the `fc.` keys).
        load_state_dict(net, read_state_dict(Path(pretrained)), pretrained,
                        optional=(head, "fc.", "classifier."))
    return strip_head(net)


# Measured faster in channels_last on CPU (BN step, batch 32, 1 thread, NCHW / channels_last:
# mobilenet_v2 96 px 1.42-1.58, resnet50 1.08-1.19; resnet18 0.86-1.02, so not it; the rest
# unmeasured): benchmarks/README.md, `bench_presets.py layouts`.
CPU_FASTER_CHANNELS_LAST = ("mobilenet_v2", "resnet50")

for _name in torchvision.models.list_models(module=torchvision.models):
    if uses_batchnorm(_name):
        register_backbone(_name, partial(build_torchvision, _name),
                          cpu_channels_last=_name in CPU_FASTER_CHANNELS_LAST)
