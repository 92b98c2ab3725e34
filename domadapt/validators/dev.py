"""Deep embedded validation, DEV (You et al., "Towards Accurate Model Selection in Deep
Unsupervised Domain Adaptation", ICML 2019; lower is better): `dev_risk`, built from
`dev_importance_weights` (domain-classifier density ratio) and `dev_weighted_risk`
(importance-weighted loss with the control-variate correction). Pure functions, arrays in, a
float out; nothing is trained but the seeded logistic-regression domain classifier.

Logged as `val_dev`: importance-weighted cross-entropy on the source hold-out, weights from a
domain classifier on bottleneck features of the source training split vs the target; None
without a hold-out (--source-val-fraction) or with fewer than 2 hold-out images.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from torch import nn

from domadapt.validators.base import HOLDOUT_HINT, EvalOutputs, register_validator

__all__ = ["dev_importance_weights", "dev_risk", "dev_weighted_risk"]


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


@register_validator("dev", higher_is_better=False, help="deep-embedded-validation (DEV) risk",
                    hint=HOLDOUT_HINT)
def val_dev(ev: EvalOutputs) -> float | None:
    if ev.holdout is None or ev.source_features is None or len(ev.holdout.labels) < 2:
        return None
    logits, features, labels = ev.holdout
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    return dev_risk(ev.source_features.numpy(), ev.target_features.numpy(), features.numpy(),
                    losses.numpy(), seed=ev.seed)
