"""Issue #14 in a run: the validators and AdaBN accuracy are logged at every evaluation, empty
where they cannot be computed, and the logged values are what they claim to be."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from domadapt.config import make_config
from domadapt.data.loaders import eval_loader
from domadapt.evaluation import outputs
from domadapt.nn.adabn import adapt_batch_stats
from domadapt.settings import build_data, resolve_config
from domadapt.train import load_trained, run

TINY = {"iters": 4, "eval_every": 2, "checkpoint_every": 2, "batch_size": 8, "num_workers": 0}


def _run(tmp_path, **kw):
    cfg = make_config("styledigits", source="gray", target="color", norm="bin", **TINY, **kw)
    metrics = run(cfg, tmp_path / "r", device="cpu", quiet=True)
    return cfg, metrics, pd.read_csv(tmp_path / "r" / "log.csv")


def test_without_hold_out_the_source_validators_are_empty(tmp_path):
    _, metrics, log = _run(tmp_path)
    assert log["val_source"].isna().all() and log["val_dev"].isna().all()
    assert log["val_entropy"].notna().all() and log["val_snd"].notna().all()
    assert "target_acc_adabn" not in log  # off unless asked
    assert metrics["val_source"] is None and metrics["val_dev"] is None


def test_hold_out_and_adabn_are_logged_and_correct(tmp_path):
    cfg, metrics, log = _run(tmp_path, source_val_fraction=0.2, adabn=True)
    assert log[["val_source", "val_dev", "val_entropy", "val_snd",
                "target_acc_adabn"]].notna().all().all()
    data = build_data(resolve_config(cfg))
    held, trained = len(data.evals["source_val"]), len(data.evals["source"])
    assert held == pytest.approx(0.2 * (held + trained), abs=10)  # 1797 images, stratified
    # The final row's numbers, recomputed from the checkpointed model:
    _, model = load_trained(tmp_path / "r")
    kw = {"batch_size": 16, "num_workers": 0, "device": torch.device("cpu")}
    logits, _, labels = outputs(model, data.evals["source_val"], **kw)
    assert log["val_source"].iloc[-1] == pytest.approx(float((logits.argmax(1) == labels)
                                                            .float().mean()))
    t_logits, _, t_labels = outputs(model, data.evals["target"], **kw)
    probs = t_logits.softmax(1)
    entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(1).mean())
    assert log["val_entropy"].iloc[-1] == pytest.approx(entropy, rel=1e-4)
    # AdaBN reads the target images in the run seed's fixed random order, 2 x batch size:
    adapted = adapt_batch_stats(model, (x for x, _ in eval_loader(
        data.evals["target"], 2 * TINY["batch_size"], seed=cfg.seed)))
    a_logits, _, _ = outputs(adapted, data.evals["target"], **kw)
    adabn = float((a_logits.argmax(1) == t_labels).float().mean())
    assert log["target_acc_adabn"].iloc[-1] == pytest.approx(adabn)
    assert metrics["target_acc_adabn"] == pytest.approx(adabn)


def test_source_val_fraction_out_of_range_fails_in_one_line(run_cli, tmp_path):
    code, _, err = run_cli("train", "--preset", "styledigits", "--source", "gray", "--target",
                           "color", "--source-val-fraction", "1.0", "--out", tmp_path / "r")
    assert code == 2 and "--source-val-fraction" in err and err.count("\n") == 1
