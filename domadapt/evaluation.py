"""Evaluation: a model's outputs on a dataset, accuracies, and the unsupervised validators.

Validators (computed at every evaluation, without target labels; `domadapt.validators`):
    val_source   accuracy on the held-out source split (--source-val-fraction > 0)
    val_entropy  mean prediction entropy on the target (lower is better)
    val_snd      soft neighborhood density on the target (Saito et al., 2021; higher is better)
    val_dev      deep embedded validation risk (You et al., 2019; lower is better): importance-
                 weighted cross-entropy on the source hold-out, weights from a logistic-
                 regression domain classifier on bottleneck features of the source training
                 split vs the target
A validator that cannot be computed for a run is None (an empty cell), never a made-up value.
In dg only val_source is computed: its model selection never sees the target
(`domadapt.settings.target_validators`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from domadapt.data import DomainDataset, eval_loader
from domadapt.nn.domains import domain_labels
from domadapt.validators import dev_risk, prediction_entropy, soft_neighborhood_density


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)


@torch.no_grad()
def outputs(model: nn.Module, dataset: DomainDataset, *, batch_size: int, num_workers: int,
            device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
            channels_last: bool = False, domain: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, bottleneck features, true labels) of every image of `dataset` (float32, CPU),
    the model in eval mode; `domain` labels the images for domain-aware norm layers
    (`domadapt.nn.domains`; None: not given)."""
    was_training = model.training
    model.eval()
    logits, features, labels = [], [], []
    for x, y in eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda"):
        x = to_device(x, device, channels_last)
        with autocast or contextlib.nullcontext(), domain_labels(model, domain):
            out, feat = model(x)
        logits.append(out.float().cpu())
        features.append(feat.float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(features), torch.cat(labels)


def predict(model: nn.Module, dataset: DomainDataset, **kw: object) -> tuple[Tensor, Tensor]:
    """(predicted labels, true labels) of every image of `dataset` (see `outputs`)."""
    logits, _, labels = outputs(model, dataset, **kw)  # type: ignore[arg-type]
    return logits.argmax(1), labels


def accuracy(preds: Tensor, labels: Tensor) -> float:
    return float((preds == labels).float().mean()) if len(labels) else float("nan")


def per_class_accuracy(preds: Tensor, labels: Tensor,
                       classes: list[str]) -> dict[str, float | None]:
    """{class: accuracy over that class's images} (None for a class without images)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(classes):
        mask = labels == i
        out[name] = accuracy(preds[mask], labels[mask]) if bool(mask.any()) else None
    return out


def validators(target_logits: Tensor, target_features: Tensor, *,
               source_features: Tensor | None = None,
               holdout: tuple[Tensor, Tensor, Tensor] | None = None,
               seed: int = 0, use_target: bool = True) -> dict[str, float | None]:
    """The validators of one evaluation (module docstring). `holdout` = (logits, features,
    labels) of the source hold-out, None without one (val_source, val_dev then None).
    `use_target` False (dg: selection must not see the target): only val_source."""
    out: dict[str, float | None] = {"val_source": None, "val_entropy": None,
                                    "val_snd": None, "val_dev": None}
    if use_target:
        out["val_entropy"] = prediction_entropy(target_logits)
        if len(target_logits) >= 2:
            out["val_snd"] = soft_neighborhood_density(target_logits)
    if holdout is not None:
        logits, features, labels = holdout
        out["val_source"] = accuracy(logits.argmax(1), labels)
        if use_target and source_features is not None and len(labels) >= 2:
            losses = nn.functional.cross_entropy(logits, labels, reduction="none")
            out["val_dev"] = dev_risk(source_features.numpy(), target_features.numpy(),
                                      features.numpy(), losses.numpy(), seed=seed)
    return out
