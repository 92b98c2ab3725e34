"""`domadapt gates` and `domadapt analyze` end to end on tiny trained runs (folder dataset of
three synthetic domains, digitnet, a few iterations): files written and the numbers in them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from domadapt.config import make_config
from domadapt.nn import BatchInstanceNorm2d
from domadapt.train import load_trained, run

CLASSES = ("bar", "column", "cross")
DOMAINS = ("alpha", "beta", "gamma")
PER_CLASS = 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_tree(root: Path) -> None:
    """Three domains of the same three shapes: white on black, colour on noise, inverted."""
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        for label, cls in enumerate(CLASSES):
            (root / domain / cls).mkdir(parents=True)
            for i in range(PER_CLASS):
                m = np.zeros((20, 20, 1))
                c = 10 + rng.integers(-3, 4, size=2)
                if label in (0, 2):
                    m[c[0] - 2:c[0] + 2, 3:-3] = 1
                if label in (1, 2):
                    m[3:-3, c[1] - 2:c[1] + 2] = 1
                if domain == "alpha":
                    img = np.repeat(m, 3, axis=2)
                elif domain == "beta":
                    img = m * rng.uniform(0.5, 1, 3) + (1 - m) * rng.uniform(0, 0.5, (20, 20, 3))
                else:
                    img = 1 - np.repeat(m, 3, axis=2) * 0.8
                Image.fromarray((img * 255).astype(np.uint8)).save(root / domain / cls / f"{i}.png")


def _options(root: Path, **kw) -> dict:
    base = {
        "dataset": "folder", "root": str(root), "source": "alpha", "target": "beta",
        "method": "dann", "norm": "bin", "backbone": "digitnet", "pretrained": "none",
        "iters": 12, "batch_size": 8, "image_size": 16, "resize_size": 18, "bottleneck_dim": 16,
        "disc_hidden": 32, "lr": 0.05, "backbone_lr_mult": 1.0, "eval_every": 12,
        "checkpoint_every": 12, "num_workers": 0, "seed": 0,
    }
    return base | kw


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished runs: transfer DANN+BIN, transfer source-only+BN, multi-domain BIN."""
    base = tmp_path_factory.mktemp("analysis")
    root = base / "data"
    _write_tree(root)
    configs = {
        "bin": _options(root),
        "bn": _options(root, method="source-only", norm="bn"),
        "multi": _options(root, setting="multidomain", source=None, target=None,
                          method="source-only"),
    }
    out = {}
    for name, opts in configs.items():
        run(make_config(**opts), base / name, device="cpu", quiet=True)
        out[name] = base / name
    return out


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def _one_line_error(code: int, out: str, err: str, message: str) -> None:
    assert code != 0
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out


# ------------------------------------------------------------------------------------- gates


def test_gates_report(runs, run_cli, tmp_path):
    from domadapt.norms.gates import gate_summary

    code, out, err = run_cli("gates", runs["bin"], "--out", tmp_path)
    assert code == 0, err
    csv = pd.read_csv(tmp_path / "gates.csv")
    _, model = load_trained(runs["bin"])
    expected = gate_summary(model)
    bins = [(name, m) for name, m in model.named_modules() if isinstance(m, BatchInstanceNorm2d)]
    assert len(bins) == 3  # digitnet: one norm per conv block
    assert list(csv["layer"]) == list(expected["layer"]) == [name for name, _ in bins]
    assert list(csv["depth"]) == [0, 1, 2]
    assert list(csv["channels"]) == [m.num_features for _, m in bins]
    np.testing.assert_allclose(csv["mean"], expected["mean"], rtol=1e-5)
    hist = csv.filter(like="hist_").to_numpy()
    assert (hist.sum(axis=1) == csv["channels"]).all()
    # network-wide numbers agree with what the trainer wrote into metrics.json
    metrics = _metrics(runs["bin"])
    total_mean = float((csv["mean"] * csv["channels"]).sum() / csv["channels"].sum())
    below = float((csv["frac_below_0.1"] * csv["channels"]).sum() / csv["channels"].sum())
    assert total_mean == pytest.approx(metrics["mean_gate"], abs=1e-5)
    assert below == pytest.approx(metrics["gate_frac_below_0.1"], abs=1e-6)
    assert f"mean rho {metrics['mean_gate']:.3f}" in out
    _assert_png(tmp_path / "gates.png")


def test_gates_default_out_is_the_analysis_folder(runs, run_cli, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(runs["bin"], run_dir)
    code, _, err = run_cli("gates", run_dir)
    assert code == 0, err
    assert sorted(p.name for p in (run_dir / "analysis").iterdir()) == ["gates.csv", "gates.png"]


def test_gates_of_a_run_without_bin_is_one_line(runs, run_cli, tmp_path):
    code, out, err = run_cli("gates", runs["bn"], "--out", tmp_path)
    _one_line_error(code, out, err, "no BIN layers (norm=bn)")
    assert not any(tmp_path.iterdir())


def test_unfinished_run_is_one_line(runs, run_cli, tmp_path):
    shutil.copy(runs["bin"] / "config.json", tmp_path / "config.json")
    for command in ("gates", "analyze"):
        code, out, err = run_cli(command, tmp_path)
        _one_line_error(code, out, err, "not finished")


def test_committed_run_without_checkpoint_says_how_to_rebuild_it(runs, run_cli, tmp_path):
    """A run as a sweep commits it (no checkpoint.pt): one line saying how to rebuild it, and
    following that advice rebuilds it with the same result."""
    committed = tmp_path / "run"
    committed.mkdir()
    for name in ("config.json", "metrics.json", "log.csv"):
        shutil.copy(runs["bin"] / name, committed / name)
    for command in ("gates", "analyze"):
        code, out, err = run_cli(command, committed, "--out", tmp_path / "report")
        _one_line_error(code, out, err, "no checkpoint")
        assert f"delete {committed / 'metrics.json'}" in err
    (committed / "metrics.json").unlink()
    run(make_config(**_options(runs["bin"].parent / "data")), committed, device="cpu", quiet=True)
    assert _metrics(committed)["target_acc"] == _metrics(runs["bin"])["target_acc"]
    code, _, err = run_cli("gates", committed, "--out", tmp_path / "report")
    assert code == 0, err


# ----------------------------------------------------------------------------------- analyze


def test_analyze_transfer_run(runs, run_cli, tmp_path):
    code, out, err = run_cli("analyze", runs["bin"], "--out", tmp_path, "--tsne-per-domain", 40,
                             "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adistance.csv", "adistance.json", "confusion.csv", "confusion.png", "per_class_acc.csv",
        "tsne.csv", "tsne.png"]
    for name in ("confusion.png", "tsne.png"):
        _assert_png(tmp_path / name)
    n = PER_CLASS * len(CLASSES)
    metrics = _metrics(runs["bin"])

    # confusion / per-class accuracy: the whole target domain, as in metrics.json
    cm = pd.read_csv(tmp_path / "confusion.csv", index_col=0)
    assert list(cm.index) == list(cm.columns) == list(CLASSES)
    assert cm.to_numpy().sum() == n and (cm.sum(axis=1) == PER_CLASS).all()
    per_class = pd.read_csv(tmp_path / "per_class_acc.csv")
    assert list(per_class["class"]) == list(CLASSES)
    np.testing.assert_array_equal(per_class["correct"], np.diag(cm.to_numpy()))
    for cls, acc in zip(per_class["class"], per_class["acc"]):
        assert acc == pytest.approx(metrics["per_class_target_acc"][cls], abs=1e-6)
    assert np.trace(cm.to_numpy()) / n == pytest.approx(metrics["target_acc"], abs=1e-6)
    assert f"accuracy on beta: {100 * metrics['target_acc']:.2f}%" in out

    # A-distance: source vs target, on backbone and bottleneck features
    adist = pd.read_csv(tmp_path / "adistance.csv")
    assert list(adist["features"]) == ["backbone", "bottleneck"]
    assert (adist["domain_a"] == "alpha").all() and (adist["domain_b"] == "beta").all()
    assert (adist["n_a"] == n).all() and (adist["n_b"] == n).all() and (adist["n_test"] == n).all()
    expected = np.clip(2 * (1 - 2 * adist["err"]), 0, 2)
    np.testing.assert_allclose(adist["d_a"], expected, atol=1e-6)
    summary = json.loads((tmp_path / "adistance.json").read_text())
    assert summary["d_a"]["backbone"] == pytest.approx(adist["d_a"][0], abs=1e-6)
    assert summary["probe"]["seed"] == 0 and len(summary["pairs"]) == 2

    # t-SNE: 40 points per domain, labelled by domain and class
    tsne = pd.read_csv(tmp_path / "tsne.csv")
    assert tsne["domain"].value_counts().to_dict() == {"alpha": 40, "beta": 40}
    assert set(tsne["class"]) <= set(CLASSES) and np.isfinite(tsne[["x", "y"]]).all().all()


def test_analyze_is_deterministic_and_subsamples(runs, run_cli, tmp_path):
    args = ["--max-per-domain", 30, "--tsne-per-domain", 20, "--quiet"]
    for out in ("a", "b"):
        code, _, err = run_cli("analyze", runs["bin"], "--out", tmp_path / out, *args)
        assert code == 0, err
    for name in ("adistance.csv", "confusion.csv", "tsne.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    adist = pd.read_csv(tmp_path / "a" / "adistance.csv")
    assert (adist["n_a"] == 30).all() and (adist["n_b"] == 30).all()
    assert pd.read_csv(tmp_path / "a" / "confusion.csv", index_col=0).to_numpy().sum() == 30


def test_analyze_multidomain_run(runs, run_cli, tmp_path):
    code, out, err = run_cli("analyze", runs["multi"], "--out", tmp_path, "--tsne-per-domain", 20,
                             "--quiet")
    assert code == 0, err
    metrics = _metrics(runs["multi"])
    adist = pd.read_csv(tmp_path / "adistance.csv")
    pairs = [("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")]
    assert list(zip(adist["domain_a"], adist["domain_b"])) == pairs * 2
    assert list(adist["features"]) == ["backbone"] * 3 + ["bottleneck"] * 3
    for domain in DOMAINS:
        assert f"accuracy on {domain}: {100 * metrics['domain_acc'][domain]:.2f}%" in out
    cm = pd.read_csv(tmp_path / "confusion.csv", index_col=0).to_numpy()
    assert cm.sum() == adist.loc[:2, ["n_a", "n_b"]].to_numpy().ravel()[[0, 1, 3]].sum()
    assert set(pd.read_csv(tmp_path / "tsne.csv")["domain"]) == set(DOMAINS)
