"""Backbones over torchvision, pretrained loading, and the domain-adaptation model.

    x --backbone--> h (feature_dim) --bottleneck--> f (bottleneck_dim) --classifier--> logits

`f` (the bottleneck output) is what the domain discriminator sees and what analysis tools embed.
The backbone's classification head (resnet `fc`, mobilenet `classifier`) is removed; its output is
the globally average-pooled, flattened last feature map. Normalization layers are converted
(`convert_norm`, bn | in | bin) *after* pretrained weights are loaded, so BIN starts from the
pretrained BatchNorm exactly.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from domadapt.config import RunConfig
from domadapt.errors import UserError
from domadapt.nn import Bottleneck, convert_norm

# torchvision constructor and weight enum of every ImageNet backbone. V1 weights everywhere:
# they are the ones the DANN / BIN literature (and its Office-Home numbers) was produced with.
_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, "MobileNet_V2_Weights"),
}
_HEAD_PREFIXES = ("fc.", "classifier.")  # head keys a feature-extractor state dict may lack
DOWNLOAD_TIMEOUT_S = 60.0


class DigitNet(nn.Module):
    """Small BN CNN for 32 px images, trained from scratch: 3 x [conv3x3-BN-ReLU-maxpool2]
    with 16/32/64 channels (32 -> 16 -> 8 -> 4 px), then the 4x4 map flattened -> 1024-d.

    Flattening keeps *where* strokes are, which is what tells digits apart; global average
    pooling loses it and made 300-iteration styledigits runs learn several times slower.
    (Other input sizes are adaptively pooled to 4x4 first.) 23 k conv parameters, 2.8 M
    multiply-adds per image: a 300-iteration DANN run takes seconds on one CPU core.
    """

    grid = 4

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in widths:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.feature_dim = c_in * self.grid**2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), self.grid), 1)


class MobileNetV2Features(nn.Module):
    """torchvision MobileNetV2 without its classifier: features -> global avg pool -> 1280-d.
    Keeps the `features.*` parameter names, so torchvision state dicts load unchanged."""

    def __init__(self, net: torchvision.models.MobileNetV2) -> None:
        super().__init__()
        self.features = net.features
        self.feature_dim: int = net.last_channel

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


class DomainAdaptModel(nn.Module):
    """backbone -> bottleneck (Linear-BN1d-ReLU) -> linear classifier.

    `forward(x)` returns `(logits, features)`, `features` being the bottleneck output.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, bottleneck_dim: int,
                 num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.bottleneck = Bottleneck(feature_dim, bottleneck_dim)
        self.classifier = nn.Linear(bottleneck_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.bottleneck(self.backbone(x))
        return self.classifier(features), features


def build_model(cfg: RunConfig, num_classes: int, *,
                load_pretrained: bool = True) -> DomainAdaptModel:
    """The model of a run: backbone (pretrained as `cfg.pretrained`, then norm-converted to
    `cfg.norm`), bottleneck of `cfg.bottleneck_dim`, classifier over `num_classes`.

    `load_pretrained=False` builds the same architecture without fetching any weights (used
    when a checkpoint is about to overwrite them).
    """
    pretrained = cfg.pretrained if load_pretrained else "none"
    backbone, feature_dim = build_backbone(cfg.backbone, pretrained)
    convert_norm(backbone, cfg.norm)
    return DomainAdaptModel(backbone, feature_dim, cfg.bottleneck_dim, num_classes)


def build_backbone(name: str, pretrained: str = "none") -> tuple[nn.Module, int]:
    """Headless backbone `name` and its feature dimension.

    pretrained: "imagenet" (torchvision weights, downloaded once into $TORCH_HOME), "none"
    (random init), or a path to a torchvision-format state dict.
    """
    if name == "digitnet":
        net = DigitNet()
        if pretrained == "imagenet":
            raise UserError("--pretrained imagenet: there are no ImageNet weights for the "
                            "digitnet backbone; use --pretrained none or a PATH")
        if pretrained != "none":
            _load_state_dict(net, _read_state_dict(Path(pretrained)), pretrained, optional=())
        return net, net.feature_dim
    if name not in _TORCHVISION:
        raise UserError(f"unknown backbone {name!r}; choose from digitnet, "
                        f"{', '.join(_TORCHVISION)}")
    constructor, enum_name = _TORCHVISION[name]
    net = constructor(weights=None)
    if pretrained == "imagenet":
        weights = getattr(torchvision.models, enum_name).IMAGENET1K_V1
        _load_state_dict(net, _download(weights, name), f"imagenet ({weights})", optional=())
    elif pretrained != "none":
        sd = _read_state_dict(Path(pretrained))
        _load_state_dict(net, sd, pretrained, optional=_HEAD_PREFIXES)
    return _strip_head(net)


def _strip_head(net: nn.Module) -> tuple[nn.Module, int]:
    if isinstance(net, torchvision.models.ResNet):
        dim = net.fc.in_features
        net.fc = nn.Identity()  # type: ignore[assignment]  # forward already flattens after avgpool
        return net, dim
    assert isinstance(net, torchvision.models.MobileNetV2)
    head = MobileNetV2Features(net)
    return head, head.feature_dim


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub opens URLs without a timeout; bound it so an unreachable host fails, not hangs."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(weights: torchvision.models.WeightsEnum, name: str) -> dict[str, Tensor]:
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError, timeouts, hash mismatch, truncated file
        raise UserError(
            f"--pretrained imagenet: could not download the {name} ImageNet weights ({e}); "
            f"if offline, pass --pretrained PATH to a torchvision state dict") from None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
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


def _load_state_dict(net: nn.Module, sd: dict[str, Tensor], origin: str,
                     optional: tuple[str, ...]) -> None:
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
