"""Evaluation: a model's outputs on a dataset, accuracies, and the unsupervised validators.

`validators` computes every registered validator (`domadapt.validators`: val_source,
val_entropy, val_snd, val_dev, then the plug-ins', in registry order) from one evaluation's
outputs, without target labels. A validator that cannot be computed for a run is None (an
empty cell), never a made-up value.
In dg only the validators that read no target image run (`reads_target` False: val_source):
its model selection never sees the target (`domadapt.settings.target_validators`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from domadapt.data import DomainDataset, eval_loader
from domadapt.nn.domains import domain_labels
from domadapt.validators import VALIDATORS, EvalOutputs, Holdout, accuracy

__all__ = ["accuracy", "outputs", "per_class_accuracy", "predict", "to_device", "validators"]


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
    """{`val_<name>`: score} of every registered validator for one evaluation, in registry
    order. `holdout` = (logits, features, labels) of the source hold-out, None without one.
    `use_target` False (dg: selection must not see the target): the validators that read
    target images (`Validator.reads_target`) are None."""
    ev = EvalOutputs(target_logits, target_features, source_features,
                     None if holdout is None else Holdout(*holdout), seed)
    return {v.column: v.compute(ev) if use_target or not v.reads_target else None
            for _, v in VALIDATORS.items()}
