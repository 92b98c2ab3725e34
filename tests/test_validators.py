"""Unsupervised validators on hand-made cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domadapt.validators import (
    dev_importance_weights,
    dev_risk,
    dev_weighted_risk,
    prediction_entropy,
    soft_neighborhood_density,
)

# ----------------------------------------------------------------------------- entropy


def test_entropy_of_uniform_predictions_is_log_k():
    assert prediction_entropy(torch.zeros(7, 5)) == pytest.approx(math.log(5), rel=1e-6)


def test_entropy_is_the_mean_over_samples_of_each_rows_entropy():
    # Row 1: p = (1/4, 3/4); row 2: p = (1/2, 1/2); row 3: near one-hot (entropy ~ 0).
    logits = torch.tensor([[math.log(0.25), math.log(0.75)], [3.0, 3.0], [0.0, -200.0]])
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expected = (h1 + math.log(2) + 0.0) / 3
    assert prediction_entropy(logits) == pytest.approx(expected, rel=1e-6)
    assert prediction_entropy(logits.numpy()) == pytest.approx(expected, rel=1e-6)


def test_entropy_rejects_a_1d_input():
    with pytest.raises(ValueError, match="N, K"):
        prediction_entropy(torch.zeros(4))


# ----------------------------------------------------------------------------- SND


def test_snd_of_identical_predictions_is_log_n_minus_1():
    # Every neighbour is equally similar: P_ij = 1/(N-1) for j != i.
    logits = torch.tensor([[2.0, 0.0, -1.0]]).repeat(6, 1)
    assert soft_neighborhood_density(logits) == pytest.approx(math.log(5), rel=1e-6)


def test_snd_of_orthogonal_one_hot_predictions_is_log_n_minus_1():
    probs = torch.eye(4)  # S_ij = 0 for all j != i: again uniform over the 3 neighbours
    assert soft_neighborhood_density(probs, probabilities=True) == pytest.approx(math.log(3))


def test_snd_on_two_clusters_matches_the_formula_by_hand():
    # f1 = f2 = e1, f3 = f4 = e2. Row i has one neighbour with S = 1 and two with S = 0:
    # P = (e^{1/t}, 1, 1) / (e^{1/t} + 2), identical for all four rows.
    t = 0.05
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    z = math.exp(1 / t) + 2
    p_near, p_far = math.exp(1 / t) / z, 1 / z
    expected = -(p_near * math.log(p_near) + 2 * p_far * math.log(p_far))
    got = soft_neighborhood_density(probs.double(), t, probabilities=True)
    assert got == pytest.approx(expected, rel=1e-9)
    # A higher temperature spreads the neighbourhood: higher density.
    assert soft_neighborhood_density(probs, 1.0, probabilities=True) > got


def test_snd_matches_the_authors_formulation_and_does_not_depend_on_chunking():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 6, generator=gen, dtype=torch.float64) * 3
    # The authors' formulation: diagonal masked to -1/t, entropy with log(p + 1e-5).
    f = torch.nn.functional.normalize(torch.softmax(logits, 1))
    mat = f @ f.T / 0.05
    mat.masked_fill_(torch.eye(37, dtype=torch.bool), -1 / 0.05)
    p = torch.softmax(mat, 1)
    reference = -(p * torch.log(p + 1e-5)).sum(1).mean().item()
    ours = soft_neighborhood_density(logits)
    assert ours == pytest.approx(reference, rel=1e-3)
    assert soft_neighborhood_density(logits, chunk_size=5) == pytest.approx(ours, rel=1e-12)
    assert soft_neighborhood_density(logits.float()) == pytest.approx(ours, rel=1e-5)


def test_snd_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        soft_neighborhood_density(torch.zeros(1, 3))


# ----------------------------------------------------------------------------- DEV


def test_dev_weighted_risk_by_hand():
    # w = (1/2, 3/2, 2), l = (1, 0, 1): L = w l = (1/2, 0, 2), mean L = 5/6, mean w = 4/3,
    # Cov(L, w) = 11/24, Var(w) = 7/12 (ddof 1), eta = -11/14,
    # R = 5/6 + eta (4/3 - 1) = 5/6 - 11/42 = 4/7.
    assert dev_weighted_risk([0.5, 1.5, 2.0], [1.0, 0.0, 1.0]) == pytest.approx(4 / 7)


def test_dev_weighted_risk_with_equal_weights_is_the_mean_loss():
    assert dev_weighted_risk([1.0, 1.0, 1.0, 1.0], [0.2, 0.4, 0.0, 1.0]) == pytest.approx(0.4)


def test_dev_weighted_risk_control_variate_removes_the_weight_noise():
    # l constant: the weighted risk mean(w l) = l mean(w) is off by the weights' mean error,
    # and the control variate (eta = -l) corrects it exactly to l.
    w = np.array([0.2, 3.0, 0.7, 1.9])
    assert dev_weighted_risk(w, np.full(4, 0.3)) == pytest.approx(0.3)


def test_dev_weighted_risk_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        dev_weighted_risk([1.0], [0.0])
    with pytest.raises(ValueError, match="length"):
        dev_weighted_risk([1.0, 2.0], [0.0])


def test_dev_weights_recover_a_gaussian_density_ratio_in_1d():
    # Source N(0, 1), target N(1, 1): p_t(x) / p_s(x) = exp(x - 1/2), linear log-odds, which
    # the logistic regression can represent exactly.
    rng = np.random.default_rng(0)
    src = rng.normal(0.0, 1.0, (4000, 1))
    tgt = rng.normal(1.0, 1.0, (4000, 1))
    val = np.array([[-1.0], [0.0], [0.5], [1.0], [2.0]])
    w = dev_importance_weights(src, tgt, val)
    np.testing.assert_allclose(w, np.exp(val[:, 0] - 0.5), rtol=0.1)


def test_dev_weights_correct_for_unequal_domain_sizes():
    # Same distribution, twice as many source rows: P(s|x) ~ 2/3, and the prior ratio
    # n_s / n_t = 2 brings the weight back to ~1.
    rng = np.random.default_rng(1)
    src, tgt = rng.normal(size=(3000, 2)), rng.normal(size=(1500, 2))
    w = dev_importance_weights(src, tgt, np.zeros((1, 2)))  # at the centre of both domains
    assert w[0] == pytest.approx(1.0, abs=0.05)  # without the prior ratio it would be ~1/2


def test_dev_risk_composes_weights_and_risk_and_is_seeded():
    rng = np.random.default_rng(2)
    src, tgt = rng.normal(size=(300, 3)), rng.normal(0.5, 1.0, size=(200, 3))
    val, loss = rng.normal(size=(40, 3)), rng.uniform(0, 2, 40)
    w = dev_importance_weights(src, tgt, val, max_per_domain=100, seed=3)
    r = dev_risk(src, tgt, val, loss, max_per_domain=100, seed=3)
    assert r == pytest.approx(dev_weighted_risk(w, loss))
    assert dev_risk(src, tgt, val, loss, max_per_domain=100, seed=3) == r


def test_dev_rejects_mismatched_feature_dimensions():
    with pytest.raises(ValueError, match="dimensions"):
        dev_importance_weights(np.zeros((5, 2)), np.ones((5, 2)), np.zeros((3, 4)))
