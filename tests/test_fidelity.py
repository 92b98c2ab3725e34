"""Issue #11: the `officehome` preset is Transfer-Learning-Library's recipe (iteration-based lr
and GRL schedules, logged as such), BIN gates train at 10 x the base lr by default, options a
run cannot use leave its key alone, and out-of-range schedule / transform options fail in one
line."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from domadapt.config import PRESETS, RunConfig, make_config
from domadapt.data.datasets.officehome import OFFICEHOME_CLASSES
from domadapt.data.testing import write_image_tree


@pytest.fixture(scope="module")
def officehome(tmp_path_factory) -> Path:
    """An Office-Home-shaped tree: 4 domains, all 65 classes, 1 tiny image each."""
    root = tmp_path_factory.mktemp("oh") / "OfficeHome"
    return write_image_tree(root, ["Art", "Clipart", "Product", "Real World"],
                            OFFICEHOME_CLASSES, 1, size=12, ext=".jpg")


TINY = ["--backbone", "resnet18", "--pretrained", "none", "--iters", "6", "--eval-every", "2",
        "--checkpoint-every", "3", "--batch-size", "4", "--image-size", "16", "--resize-size",
        "18", "--num-workers", "0", "--device", "cpu", "--quiet"]


def test_officehome_preset_logs_the_iteration_based_schedules(officehome, run_cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli("train", "--preset", "officehome", "--root", officehome, "--source",
                           "Ar", "--target", "Cl", "--norm", "bin", "--out", out, *TINY)
    assert code == 0, err
    log = pd.read_csv(out / "log.csv")
    assert list(log["iter"]) == [2, 4, 6]
    lr0 = 0.01
    for _, row in log.iterrows():
        it = int(row["iter"])
        last = it - 1  # the row's lr is the last step's: iteration it - 1 (0-based)
        assert row["lr"] == pytest.approx(lr0 * (1 + 0.001 * last) ** -0.75, rel=1e-12)
        assert row["gate_lr"] == pytest.approx(10 * row["lr"], rel=1e-12)  # 10 x the BASE lr
        window = range(it - 2, it)  # the GRL coefficient: mean over the window's iterations
        grl = sum(2 / (1 + math.exp(-i / 1000)) - 1 for i in window) / 2
        assert row["grl_coeff"] == pytest.approx(grl, rel=1e-6)  # logged as float32
    metrics = pd.read_json(out / "metrics.json", typ="series")
    best = log["target_acc"].max()
    assert metrics["oracle_target_acc"] == pytest.approx(best)
    assert metrics["oracle_iter"] == log.loc[log["target_acc"] == best, "iter"].iloc[0]
    config = pd.read_json(out / "config.json", typ="series")["config"]
    assert config["lr_schedule"] == "iteration" and config["resize_mode"] == "square"
    assert config["norm_options"] == {"gate_lr_mult": 10.0, "gate_lr_rule": "base"}
    assert config["method_options"]["grl_schedule"] == "iteration"


def test_presets_keep_the_ganin_form_and_tll_constants():
    tll = make_config("officehome", source="Art", target="Clipart")
    assert (tll.iters, tll.lr_schedule, tll.lr_gamma, tll.lr_decay) == (30000, "iteration",
                                                                         0.001, 0.75)
    assert tll.method_options["grl_warmup"] == 1000.0 and not tll.amp
    assert (tll.crop_scale_min, tll.crop_scale_max, tll.interpolation) == (0.08, 1.0, "bicubic")
    assert tll.eval_every == 1000
    ganin = make_config("officehome-ganin", source="Art", target="Clipart")
    assert (ganin.iters, ganin.lr_schedule, ganin.lr_gamma) == (5000, "progress", 10.0)
    assert ganin.method_options["grl_schedule"] == "progress"
    assert PRESETS["officehome-ganin"] == {}


def test_gate_rule_layer_is_available_and_recorded():
    cfg = make_config("pacs-cpu", source="A", target="C", norm="bin", gate_lr_rule="layer")
    assert cfg.norm_options == {"gate_lr_mult": 10.0, "gate_lr_rule": "layer"}
    assert cfg.key() != cfg.replace(norm_options={"gate_lr_rule": "base"}).key()


def test_options_a_run_cannot_use_leave_its_key_alone():
    bn = make_config("pacs-cpu", source="A", target="C", norm="bn")
    assert bn.key() == make_config("pacs-cpu", source="A", target="C", norm="bn",
                                   gate_lr_mult=3.0, gate_lr_rule="layer").key()
    so = make_config("pacs-cpu", source="A", target="C", method="source-only")
    assert so.key() == make_config("pacs-cpu", source="A", target="C", method="source-only",
                                   adv_weight=0.1, grl_schedule="iteration").key()
    assert make_config("pacs-cpu", source="A", target="C", adv_weight=0.1).key() != \
        make_config("pacs-cpu", source="A", target="C").key()


def test_configs_of_the_first_release_read_as_layer_relative_gates():
    legacy = {k: v for k, v in RunConfig(source="A", target="B", norm="bin").to_dict().items()
              if k not in ("method_options", "norm_options")}
    legacy |= {"gate_lr_mult": 10.0, "adv_weight": 0.3, "disc_hidden": 256}
    cfg = RunConfig.from_dict(legacy)
    assert cfg.norm_options == {"gate_lr_mult": 10.0, "gate_lr_rule": "layer"}
    assert cfg.method_options["adv_weight"] == 0.3 and cfg.method_options["disc_hidden"] == 256


@pytest.mark.parametrize(("args", "named"), [
    (["--grl-warmup", "-5"], "--grl-warmup"),
    (["--crop-scale-min", "0"], "--crop-scale"),
    (["--crop-scale-min", "0.9", "--crop-scale-max", "0.5"], "--crop-scale"),
    (["--crop-scale-max", "1.5"], "--crop-scale"),
    (["--resize-mode", "no-such-mode"], "--resize-mode"),
    (["--interpolation", "magic"], "--interpolation"),
    (["--lr-schedule", "no-such-form"], "--lr-schedule"),
    (["--grl-schedule", "no-such-form"], "--grl-schedule"),
    (["--gate-lr-rule", "no-such-rule"], "--gate-lr-rule"),
])
def test_bad_schedule_and_transform_options_fail_in_one_line(run_cli, tmp_path, args, named):
    code, _, err = run_cli("train", "--preset", "styledigits", "--source", "gray", "--target",
                           "color", "--norm", "bin", "--out", tmp_path / "r", *args)
    assert code != 0 and named in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()
