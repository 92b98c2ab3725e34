"""Confusion matrix and per-class accuracy of a classifier's predictions.

C[i, j] = #{samples of true class i predicted as class j}; per-class accuracy (recall) of
class i is C[i, i] / sum_j C[i, j]; overall accuracy is trace(C) / sum(C).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    preds = np.asarray(preds, dtype=np.int64).ravel()
    if labels.shape != preds.shape:
        raise ValueError(f"{labels.size} labels but {preds.size} predictions")
    for name, v in (("label", labels), ("prediction", preds)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} outside [0, {num_classes}): {v.min()}..{v.max()}")
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(cm: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per class: class, n (true count), correct, acc (NaN where n = 0)."""
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} classes")
    n = cm.sum(axis=1)
    correct = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(n > 0, correct / np.maximum(n, 1), np.nan)
    return pd.DataFrame({"class": list(class_names), "n": n, "correct": correct, "acc": acc})


def confusion_frame(cm: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """The matrix as a labelled table: index = true class, columns = predicted class."""
    names = list(class_names)
    return pd.DataFrame(
        cm,
        index=pd.Index(names, name="true\\predicted"),
        columns=names,
    )
