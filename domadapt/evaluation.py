"""Evaluation: predictions of a model on a dataset, accuracies, and a run's evaluation record."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from domadapt.data import DomainDataset, eval_loader


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)


@torch.no_grad()
def predict(model: nn.Module, dataset: DomainDataset, *, batch_size: int, num_workers: int,
            device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
            channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """(predicted labels, true labels) of every image of `dataset`, model in eval mode."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for x, y in eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda"):
        x = to_device(x, device, channels_last)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        preds.append(logits.argmax(1).cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


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
