"""Features of a trained model on a data set: backbone h = g(x), bottleneck f = b(h), logits c(f)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from domadapt.progress import progress


@dataclass(frozen=True)
class Features:
    """Per-sample outputs of `x -> backbone -> bottleneck -> classifier`, row-aligned."""

    backbone: np.ndarray  # (n, feature_dim) pooled backbone features h
    bottleneck: np.ndarray  # (n, bottleneck_dim) f, what the domain discriminator sees
    logits: np.ndarray  # (n, num_classes)
    labels: np.ndarray  # (n,) int64 true classes

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
    *,
    quiet: bool = False,
    desc: str | None = None,
) -> Features:
    """Run `model` (a DomainAdaptModel: .backbone, .bottleneck, .classifier) in eval mode over
    (images, labels) batches; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    hs, fs, zs, ys = [], [], [], []
    try:
        for x, y in progress(batches, quiet=quiet, desc=desc, leave=False):
            h = model.backbone(x.to(device, non_blocking=True))
            f = model.bottleneck(h)
            z = model.classifier(f)
            for out, t in ((hs, h), (fs, f), (zs, z)):
                out.append(t.float().cpu().numpy())
            ys.append(np.asarray(y, dtype=np.int64))
    finally:
        model.train(was_training)
    if not ys:
        raise ValueError("no batches to extract features from")
    return Features(np.concatenate(hs), np.concatenate(fs), np.concatenate(zs), np.concatenate(ys))
