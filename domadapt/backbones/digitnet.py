"""`digitnet`: a small BN CNN for the 32 px embedded dataset, trained from scratch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from domadapt.backbones.base import load_state_dict, read_state_dict, register_backbone
from domadapt.errors import UserError


class DigitNet(nn.Module):
    """3 x [conv3x3-BN-ReLU-maxpool2] with 16/32/64 channels (32 -> 16 -> 8 -> 4 px), then the
    4x4 map flattened -> 1024-d.

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


def build_digitnet(pretrained: str) -> tuple[nn.Module, int]:
    net = DigitNet()
    if pretrained == "imagenet":
        raise UserError("--pretrained imagenet: there are no ImageNet weights for the "
                        "digitnet backbone; use --pretrained none or a PATH")
    if pretrained != "none":
        load_state_dict(net, read_state_dict(Path(pretrained)), pretrained)
    return net, net.feature_dim


# CPU step, batch 32, 1 thread: NCHW / channels_last = 1.44-1.52 (benchmarks/README.md).
# Three 2x max-pools: 8 px is the least that leaves one pixel.
register_backbone("digitnet", build_digitnet, cpu_channels_last=True, min_image_size=8)
