"""Unsupervised validators: scores of a model computed WITHOUT target labels, for model selection.

- `prediction_entropy`: mean entropy of the target predictions (lower is better).
- `soft_neighborhood_density`: SND (Saito et al., "Tune it the Right Way: Unsupervised
  Validation of Domain Adaptation via Soft Neighborhood Density", ICCV 2021; higher is better).
- `dev_risk`: deep embedded validation (You et al., "Towards Accurate Model Selection in Deep
  Unsupervised Domain Adaptation", ICML 2019; lower is better), built from
  `dev_importance_weights` (domain-classifier density ratio) and `dev_weighted_risk`
  (importance-weighted loss with the control-variate correction).

All functions are pure: arrays or tensors in, a float out; nothing is trained but DEV's
logistic-regression domain classifier, which is seeded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import Tensor

from domadapt.nn.losses import entropy_of_log_probs

__all__ = [
    "dev_importance_weights",
    "dev_risk",
    "dev_weighted_risk",
    "prediction_entropy",
    "soft_neighborhood_density",
]


def _as_2d_float(x: Tensor | ArrayLike, name: str) -> Tensor:
    t = torch.as_tensor(x).detach()
    if t.dim() != 2 or t.size(0) == 0 or t.size(1) == 0:
        raise ValueError(f"{name}: expected a non-empty [N, K] array, got shape {tuple(t.shape)}")
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def prediction_entropy(logits: Tensor | ArrayLike) -> float:
    """Mean Shannon entropy (nats) of the softmax predictions: (1/N) sum_i H(softmax(z_i)),
    H(p) = -sum_k p_k log p_k. Logits [N, K]. Range [0, log K]; lower = more confident.
    """
    log_p = F.log_softmax(_as_2d_float(logits, "logits"), dim=1)
    return entropy_of_log_probs(log_p).mean().item()


def soft_neighborhood_density(
    scores: Tensor | ArrayLike,
    temperature: float = 0.05,
    *,
    probabilities: bool = False,
    chunk_size: int = 2048,
) -> float:
    """SND of the target predictions (Saito et al., ICCV 2021); higher is better.

    With p_i = softmax(z_i) (or the given probabilities when `probabilities=True`),
    f_i = p_i / ||p_i||_2, S_ij = f_i . f_j, and for each i the softmax over its neighbours
    j != i (the diagonal is excluded exactly):

        P_ij = exp(S_ij / tau) / sum_{l != i} exp(S_il / tau),
        SND  = -(1/N) sum_i sum_{j != i} P_ij log P_ij,     tau = `temperature` (0.05).

    (The authors' code masks the diagonal with S_ii = -1 instead of removing it and adds 1e-5
    inside the log; both change SND by less than ~1e-5 relative.) Needs N >= 2. Computed in
    row blocks of `chunk_size`, so memory is O(chunk_size * N).
    """
    s = _as_2d_float(scores, "scores")
    n = s.size(0)
    if n < 2:
        raise ValueError(f"soft_neighborhood_density needs at least 2 samples, got {n}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = s if probabilities else F.softmax(s, dim=1)
    f = F.normalize(p, p=2, dim=1)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, chunk_size):
        block = f[start:start + chunk_size] @ f.T / temperature  # [b, N]
        rows = torch.arange(block.size(0))
        block[rows, rows + start] = -math.inf  # drop each sample's similarity to itself
        total += entropy_of_log_probs(F.log_softmax(block, dim=1)).double().sum()
    return (total / n).item()


# --------------------------------------------------------------------------- DEV

def dev_importance_weights(
    source_features: ArrayLike,
    target_features: ArrayLike,
    val_features: ArrayLike,
    *,
    C: float = 1.0,
    max_per_domain: int = 5000,
    seed: int = 0,
) -> np.ndarray:
    """Importance weights w(x) ~ p_target(x) / p_source(x) for the source-validation samples.

    Domain classifier (our choice): scikit-learn `LogisticRegression` (L2, inverse strength
    `C` = 1.0, lbfgs) on the standardised features (mean/std of the pooled training set),
    trained to tell `source_features` (label 1; the source TRAINING split, never the
    validation split it is applied to) from `target_features` (label 0), each subsampled
    without replacement to at most `max_per_domain` rows with `seed`. Its decision function
    is the log-odds a(x) = log P(s|x) - log P(t|x), so by Bayes

        w(x) = P(t|x) / P(s|x) * n_s / n_t = exp(-a(x)) * n_s / n_t,

    n_s, n_t the numbers of rows it was trained on. The weights are not clipped (DEV's
    control variate is what tames their variance). Returns float64 [N_val].
    """
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)

    def subsample(x: ArrayLike, name: str) -> np.ndarray:
        a = np.asarray(x, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty [N, D] array, got shape {a.shape}")
        if a.shape[0] > max_per_domain:
            a = a[rng.choice(a.shape[0], max_per_domain, replace=False)]
        return a

    xs, xt = subsample(source_features, "source_features"), subsample(target_features,
                                                                        "target_features")
    xv = np.asarray(val_features, dtype=np.float64)
    if xv.ndim != 2 or xv.shape[1] != xs.shape[1] or xt.shape[1] != xs.shape[1]:
        raise ValueError(f"feature dimensions differ: source {xs.shape}, target {xt.shape}, "
                         f"validation {xv.shape}")
    x = np.concatenate([xs, xt])
    y = np.concatenate([np.ones(len(xs)), np.zeros(len(xt))])
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    clf = LogisticRegression(C=C, max_iter=1000)
    clf.fit((x - mean) / std, y)
    log_odds = clf.decision_function((xv - mean) / std)  # log P(s|x) - log P(t|x)
    return np.exp(-log_odds) * (len(xs) / len(xt))


def dev_weighted_risk(weights: ArrayLike, losses: ArrayLike) -> float:
    """DEV risk from importance weights w_i and per-sample validation losses l_i (You et al.,
    ICML 2019, Eq. 5 / Algorithm 1); lower is better.

    With L_i = w_i l_i, the control-variate coefficient eta = -Cov(L, w) / Var(w) (both with
    ddof = 1) and

        R_DEV = mean(L) + eta * mean(w) - eta,

    i.e. the importance-weighted risk corrected by the known expectation E[w] = 1. When all
    weights are equal (Var(w) = 0) eta is taken as 0. Needs at least 2 samples.
    """
    w = np.asarray(weights, dtype=np.float64).ravel()
    loss = np.asarray(losses, dtype=np.float64).ravel()
    if w.shape != loss.shape:
        raise ValueError(f"weights and losses differ in length: {w.size} vs {loss.size}")
    if w.size < 2:
        raise ValueError(f"dev_weighted_risk needs at least 2 validation samples, got {w.size}")
    weighted = w * loss
    var_w = w.var(ddof=1)
    eta = 0.0 if var_w == 0 else -np.cov(weighted, w, ddof=1)[0, 1] / var_w
    return float(weighted.mean() + eta * w.mean() - eta)


def dev_risk(
    source_features: ArrayLike,
    target_features: ArrayLike,
    val_features: ArrayLike,
    val_losses: ArrayLike,
    *,
    C: float = 1.0,
    max_per_domain: int = 5000,
    seed: int = 0,
) -> float:
    """Deep embedded validation (You et al., ICML 2019); lower is better.

    Features are the model's bottleneck features; the split is the run's: `source_features`
    from the source training split, `val_features` and `val_losses` (per-sample
    cross-entropy of the model) from the held-out source validation split
    (--source-val-fraction), `target_features` from the unlabeled target. Equals
    `dev_weighted_risk(dev_importance_weights(source, target, val), val_losses)`.
    """
    w = dev_importance_weights(source_features, target_features, val_features,
                               C=C, max_per_domain=max_per_domain, seed=seed)
    return dev_weighted_risk(w, val_losses)
