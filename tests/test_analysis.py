"""Analysis building blocks on synthetic inputs: A-distance, gate summary, confusion, t-SNE, figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from domadapt.analysis.adistance import proxy_a_distance
from domadapt.analysis.confusion import confusion_frame, confusion_matrix, per_class_accuracy
from domadapt.analysis.features import extract_features
from domadapt.analysis.tsne import subsample_indices, tsne_embedding
from domadapt.errors import UserError
from domadapt.norms.gates import HIST_COLUMNS, gate_totals, summarize_gates

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


# ---------------------------------------------------------------- proxy A-distance


def test_adistance_same_distribution_is_near_zero():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    res = proxy_a_distance(a, b, seed=0)
    assert res.d_a < 0.2
    assert res.n_a == res.n_b == 400 and res.n_test == 400


def test_adistance_identical_features_is_zero():
    a = np.random.default_rng(1).normal(size=(200, 16))
    assert proxy_a_distance(a, a.copy()).d_a < 0.2


def test_adistance_separated_gaussians_is_near_two():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 32))
    b = rng.normal(size=(200, 32))
    b[:, 0] += 8.0  # 8 sigma apart along one axis: Bayes error Phi(-4) ~ 3e-5
    res = proxy_a_distance(a, b, seed=0)
    assert res.d_a > 1.9 and res.err < 0.025
    assert res.d_a == pytest.approx(2 * (1 - 2 * res.err))


def test_adistance_imbalanced_domains_stay_unbiased():
    """A constant guess on 500 vs 50 samples would score 9% error with a plain error rate."""
    rng = np.random.default_rng(2)
    res = proxy_a_distance(rng.normal(size=(500, 8)), rng.normal(size=(50, 8)), seed=0)
    assert res.d_a < 0.3


def test_adistance_partial_overlap_lies_between():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
    b[:, 0] += 1.0  # Bayes error of a unit shift in 1 of 4 dims: Phi(-0.5) = 0.31 -> d_A ~ 0.77
    res = proxy_a_distance(a, b, seed=0)
    assert 0.4 < res.d_a < 1.2


def test_adistance_is_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 0.5
    assert proxy_a_distance(a, b, seed=3) == proxy_a_distance(a, b, seed=3)


def test_adistance_rejects_too_few_samples():
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="at least 10 samples"):
        proxy_a_distance(rng.normal(size=(5, 4)), rng.normal(size=(50, 4)))


def test_adistance_rejects_nan_features():
    a = np.zeros((20, 3))
    a[0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        proxy_a_distance(a, np.ones((20, 3)))


# ---------------------------------------------------------------- gates


def test_summarize_gates_exact_numbers():
    gates = {
        "backbone.bn1": torch.tensor([0.0, 0.05, 0.1, 0.5, 0.95, 1.0]),
        "backbone.layer1.bn": torch.full((4,), 0.25),
    }
    s = summarize_gates(gates)
    assert list(s["layer"]) == ["backbone.bn1", "backbone.layer1.bn"]
    assert list(s["depth"]) == [0, 1]
    assert list(s["channels"]) == [6, 4]
    assert s["mean"].tolist() == pytest.approx([2.6 / 6, 0.25])
    assert s["frac_below_0.1"].tolist() == pytest.approx([2 / 6, 0.0])  # 0.1 itself is not below
    assert s["frac_above_0.9"].tolist() == pytest.approx([2 / 6, 0.0])
    hist0 = s.loc[0, HIST_COLUMNS].to_numpy(dtype=int)
    assert hist0.tolist() == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]  # 1.0 falls in the last, closed bin
    assert s.loc[1, HIST_COLUMNS].sum() == 4 and s.loc[1, "hist_0.2_0.3"] == 4
    assert s.loc[0, "min"] == 0.0 and s.loc[0, "max"] == 1.0

    tot = gate_totals(s)
    assert tot["layers"] == 2 and tot["channels"] == 10
    assert tot["mean"] == pytest.approx((2.6 + 1.0) / 10)  # every channel weighs the same
    assert tot["frac_below_0.1"] == pytest.approx(0.2)
    assert tot["frac_above_0.9"] == pytest.approx(0.2)


def _bin_net() -> nn.Module:
    from domadapt.norms import convert_norm

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)))
    return convert_norm(net, "bin")


def test_gate_summary_of_a_model_with_hand_set_gates():
    from domadapt.nn import mean_gate
    from domadapt.norms.gates import gate_summary

    net = _bin_net()
    with torch.no_grad():
        net[1].rho.copy_(torch.tensor([0.0, 0.2, 0.92, 1.0]))
        net[3][1].rho.copy_(torch.tensor([0.05, 0.05, 0.5, 0.5, 0.5, 0.95]))
    s = gate_summary(net)
    assert list(s["layer"]) == ["1", "3.1"]  # network order, module names
    assert list(s["channels"]) == [4, 6]
    assert s["mean"].tolist() == pytest.approx([2.12 / 4, 2.55 / 6])
    assert s["frac_below_0.1"].tolist() == pytest.approx([1 / 4, 2 / 6])
    assert s["frac_above_0.9"].tolist() == pytest.approx([2 / 4, 1 / 6])
    assert s.loc[1, ["hist_0.0_0.1", "hist_0.5_0.6", "hist_0.9_1.0"]].tolist() == [2, 3, 1]
    tot = gate_totals(s)
    assert tot["mean"] == pytest.approx(mean_gate(net))  # the definition in metrics.json
    assert tot["mean"] == pytest.approx(4.67 / 10)
    assert tot["frac_below_0.1"] == pytest.approx(3 / 10)


def test_gate_totals_agree_with_the_trainer_metrics():
    """metrics.json's mean_gate / gate_frac_below_0.1 and the gate report share one definition."""
    from domadapt.nn import gate_fraction_below, gate_parameters, mean_gate
    from domadapt.norms.gates import gate_summary

    net, gen = _bin_net(), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rho in gate_parameters(net):
            rho.copy_(torch.rand(rho.shape, generator=gen) * 0.4)  # about 1 in 4 below 0.1
    tot = gate_totals(gate_summary(net))
    mean, frac_low = mean_gate(net), gate_fraction_below(net)
    assert tot["mean"] == pytest.approx(mean)
    assert tot["frac_below_0.1"] == pytest.approx(frac_low)


def test_gate_summary_without_bin_layers_is_a_user_error():
    from domadapt.norms.gates import gate_summary

    with pytest.raises(UserError, match="no BIN layers"):
        gate_summary(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


# ---------------------------------------------------------------- confusion


def test_confusion_matches_hand_count():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 1, 0, 1, 1, 0, 2, 2, 1])
    cm = confusion_matrix(labels, preds, num_classes=4)
    expected = np.array([
        [2, 1, 0, 0],
        [0, 2, 0, 0],
        [1, 1, 2, 0],
        [0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(cm, expected)
    acc = per_class_accuracy(cm, ["a", "b", "c", "d"])
    assert acc["n"].tolist() == [3, 2, 4, 0]
    assert acc["correct"].tolist() == [2, 2, 2, 0]
    assert acc["acc"].tolist()[:3] == pytest.approx([2 / 3, 1.0, 0.5])
    assert np.isnan(acc["acc"].iloc[3])
    frame = confusion_frame(cm, ["a", "b", "c", "d"])
    assert frame.loc["c", "a"] == 1 and frame.loc["a", "b"] == 1


def test_confusion_rejects_out_of_range():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), num_classes=3)


# ---------------------------------------------------------------- features, t-SNE


class _TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.bottleneck = nn.Linear(4, 5)
        self.classifier = nn.Linear(5, 3)

    def forward(self, x):
        f = self.bottleneck(self.backbone(x))
        return self.classifier(f), f


def test_extract_features_matches_forward_in_eval_mode():
    torch.manual_seed(0)
    model = _TinyModel().train()
    x, y = torch.randn(10, 3, 8, 8), torch.arange(10) % 3
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    feats = extract_features(model, batches, quiet=True)
    assert model.training  # mode restored
    model.eval()
    logits, f = model(x)
    np.testing.assert_allclose(feats.bottleneck, f.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats.logits, logits.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert feats.backbone.shape == (10, 4)
    np.testing.assert_array_equal(feats.labels, y.numpy())
    np.testing.assert_array_equal(feats.preds, logits.argmax(1).numpy())


def test_subsample_indices_caps_every_group():
    groups = np.array([0] * 50 + [1] * 5 + [2] * 20)
    idx = subsample_indices(groups, 10, seed=0)
    assert np.bincount(groups[idx]).tolist() == [10, 5, 10]
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, subsample_indices(groups, 10, seed=0))


def test_tsne_separates_separated_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(40, 10)), rng.normal(size=(40, 10)) + 20.0])
    xy = tsne_embedding(x, seed=0)
    assert xy.shape == (80, 2)
    gap = np.linalg.norm(xy[:40].mean(0) - xy[40:].mean(0))
    spread = max(xy[:40].std(0).max(), xy[40:].std(0).max())
    assert gap > 3 * spread
    np.testing.assert_allclose(xy, tsne_embedding(x, seed=0))  # seeded


# ---------------------------------------------------------------- figures


def test_figures_render_headless(tmp_path):
    from domadapt import plots

    rng = np.random.default_rng(0)
    fig = plots.gates_figure([rng.uniform(size=8), np.full(16, 0.3)], ["l0", "l1"], "gates")
    plots.save_png(fig, tmp_path / "gates.png")
    fig = plots.tsne_figure(rng.normal(size=(30, 2)), np.arange(30) % 2, ["src", "tgt"],
                            np.arange(30) % 3, ["a", "b", "c"], "tsne")
    plots.save_png(fig, tmp_path / "tsne.png")
    cm = confusion_matrix(rng.integers(0, 3, 50), rng.integers(0, 3, 50), 3)
    plots.save_png(plots.confusion_figure(cm, ["a", "b", "c"], "cm"), tmp_path / "cm.png")
    for name in ("gates.png", "tsne.png", "cm.png"):
        assert_png(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "gates.png", "tsne.png"]


def test_missing_matplotlib_is_one_clear_line(monkeypatch):
    import sys

    from domadapt import plots

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match=r"matplotlib is missing: pip install 'domadapt\[plot\]'"):
        plots.new_figure(3, 3)


def test_reports_check_matplotlib_before_any_work(monkeypatch, tmp_path, run_cli):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    for command in ("gates", "analyze", "compare"):
        code, out, err = run_cli(command, tmp_path / "missing")  # would fail later otherwise
        assert code != 0 and err.strip() == "error: matplotlib is missing: pip install 'domadapt[plot]'"
        assert "Traceback" not in out
