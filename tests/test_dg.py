"""Domain generalization (`domadapt dg`, `sweep --dg`): the data protocol (training-domain
hold-out, the target left out), no target image read while training, training independent of
the target's content, exact resume, the CLI and its refusals, the sweep's cells, the DG table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_cdan import kill_and_resume_matches, log_rows, write_colour_tree
from test_tables import full_sweep, read_table, write_record, write_run  # noqa: F401 (fixture)

from domadapt import engine
from domadapt.config import RunConfig, make_config
from domadapt.data import dataset as dataset_module
from domadapt.data import get_dataset
from domadapt.data.manifest import scan_domain
from domadapt.errors import UserError
from domadapt.rundir import RunDir
from domadapt.settings import build_data, resolve_config
from domadapt.sweep import plan_sweep
from domadapt.tables import Layout, write_tables
from domadapt.tables.comparisons import count_label
from domadapt.tables.render import dg_tables, transfer_tables
from domadapt.train import run

DOMAINS = ("alpha", "beta", "gamma")
TARGET = "beta"


def write_dg_tree(root: Path, per_class: int = 5, target_seed: int = 1) -> Path:
    """Three domains, each its own brightness and noise; the target's (beta's) pixels drawn
    with `target_seed`."""
    return write_colour_tree(root, [
        (domain, scale, noise, np.random.default_rng(target_seed if domain == TARGET else 10 + k))
        for k, (domain, scale, noise) in enumerate(zip(DOMAINS, (1.0, 0.6, 0.8), (0.1, 0.3, 0.2),
                                                       strict=True))], per_class)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_dg_tree(tmp_path_factory.mktemp("dg") / "data")


def dg_config(tree: Path, **options) -> RunConfig:
    """`domadapt dg --preset styledigits --target beta --norm bin --iters 4 --eval-every 2
    --checkpoint-every 2 --batch-size 6` on the tiny tree."""
    return make_config("styledigits", **{
        "dataset": "folder", "root": str(tree), "setting": "dg", "target": TARGET,
        "method": "source-only", "norm": "bin", "iters": 4, "eval_every": 2,
        "checkpoint_every": 2, "batch_size": 6, **options})


def domain_paths(tree: Path, domain: str) -> set[Path]:
    return {p for p, _ in scan_domain(get_dataset("folder"), tree, domain)}


# -- the configuration -------------------------------------------------------------------------

def test_dg_config_defaults_name_and_refusals():
    cfg = make_config(dataset="toy", setting="dg", target="Beta")
    assert cfg.method == "source-only"  # ERM
    assert cfg.source_val_fraction == 0.2  # DomainBed's training-domain hold-out
    assert make_config(dataset="toy", setting="dg", target="Beta", method="source-only",
                       source_val_fraction=0.0).source_val_fraction == 0.0
    assert make_config(dataset="toy", source="A", target="B").source_val_fraction == 0.0
    assert cfg.name() == "dg-Beta_erm_bn_s0"
    assert RunConfig.from_dict(cfg.to_dict()).key() == cfg.key()
    for bad in ({}, {"target": "Beta", "source": "Alpha"}):
        with pytest.raises(UserError, match="a dg run needs --target"):
            RunConfig(dataset="toy", setting="dg", method="source-only", **bad)


# -- the data protocol ---------------------------------------------------------------------------

def test_dg_trains_on_the_other_domains_and_holds_out_part_of_each(tree):
    cfg = resolve_config(dg_config(tree))
    assert cfg.source is None and cfg.target == TARGET and cfg.source_val_fraction == 0.2
    data = build_data(cfg)
    assert set(data.train) == {"source"}  # source-only: no target loader
    assert list(data.evals) == ["target", "source_val"]  # no fit diagnostic on the train set
    train = {p for p, _ in data.train["source"].items}
    held = {p for p, _ in data.evals["source_val"].items}
    target = {p for p, _ in data.evals["target"].items}
    assert target == domain_paths(tree, TARGET)  # the whole held-out domain is scored
    for d in ("alpha", "gamma"):  # every training domain, 1 of 5 images per class held out
        mine = domain_paths(tree, d)
        assert len(mine & held) == 3 and mine - held <= train and len(mine & train) == 12
    assert not train & held and not (train | held) & target
    assert data.info["domains"] == ["alpha", "gamma"] and data.info["held_out"] == TARGET
    assert set(data.info["fingerprint"]) == set(DOMAINS)
    assert data.info["num_images"] == {"source": 24, "target": 15, "source_val": 6}
    everything = build_data(resolve_config(dg_config(tree, source_val_fraction=0.0)))
    assert list(everything.evals) == ["target"] and len(everything.train["source"]) == 30


def _spy_reads(monkeypatch) -> list[tuple[Path, bool]]:
    """Every image the data layer decodes, as (path, inside Trainer.evaluate)."""
    reads: list[tuple[Path, bool]] = []
    phase = {"eval": False}
    load = dataset_module.load_image

    def spy(path):
        reads.append((Path(path), phase["eval"]))
        return load(path)

    evaluate = engine.Trainer.evaluate

    def flagged(self):
        phase["eval"] = True
        try:
            return evaluate(self)
        finally:
            phase["eval"] = False

    monkeypatch.setattr(dataset_module, "load_image", spy)
    monkeypatch.setattr(engine.Trainer, "evaluate", flagged)
    return reads


@pytest.mark.parametrize("eval_every", [4, 2])
def test_no_target_image_is_read_while_training(tree, tmp_path, monkeypatch, eval_every):
    """eval_every 4 = iters: the one evaluation is the final one, and nothing read before it
    is a target image. eval_every 2: the target is read only inside the evaluations (model in
    eval mode, no gradient), never by the training loop."""
    reads = _spy_reads(monkeypatch)
    run(dg_config(tree, eval_every=eval_every), tmp_path / "r", device="cpu", quiet=True)
    target = domain_paths(tree, TARGET)
    first_eval = next(i for i, (_, in_eval) in enumerate(reads) if in_eval)
    training = {p for p, in_eval in reads if not in_eval}
    assert training and not training & target  # the loop read images, none of the target
    assert {p.parent.parent.name for p in training} == {"alpha", "gamma"}  # both, pooled
    assert {p for p, in_eval in reads if in_eval} >= target  # the target is scored whole
    if eval_every == 4:
        assert not {p for p, _ in reads[:first_eval]} & target


def test_training_does_not_depend_on_the_target_images(tree, tmp_path):
    """The same run over a copy of the tree whose target images are other pixels: the trained
    network (every parameter and statistic) and the training-domain validation are identical
    bit for bit; only the target's accuracy may move."""
    other = write_dg_tree(tmp_path / "other", target_seed=99)
    assert (tree / TARGET / "c0" / "0.png").read_bytes() != (
        other / TARGET / "c0" / "0.png").read_bytes()
    a = run(dg_config(tree), tmp_path / "a", device="cpu", quiet=True)
    b = run(dg_config(other), tmp_path / "b", device="cpu", quiet=True)
    state_a = RunDir(tmp_path / "a").read_checkpoint()["method"]
    state_b = RunDir(tmp_path / "b").read_checkpoint()["method"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    train_cols = ("iter", "cls_loss", "train_acc", "val_source", "mean_gate")
    assert ([{k: r[k] for k in train_cols} for r in log_rows(tmp_path / "a")]
            == [{k: r[k] for k in train_cols} for r in log_rows(tmp_path / "b")])
    assert a["run_key"] == b["run_key"]  # the root is not part of the key


def test_dg_resumes_bit_identically(tree, tmp_path, monkeypatch):
    kill_and_resume_matches(dg_config(tree), tmp_path, monkeypatch)


# -- the command line ----------------------------------------------------------------------------

def _dg_args(tree: Path, *extra) -> list:
    return ["dg", "--preset", "styledigits", "--dataset", "folder", "--root", tree,
            "--iters", "4", "--eval-every", "2", "--checkpoint-every", "2", "--batch-size", "6",
            *extra]


def test_cli_dg_run_records_the_protocol(tree, tmp_path, run_cli):
    code, out, err = run_cli(*_dg_args(tree, "--target", "B", "--norm", "bn", "--quiet",
                                       "--out", tmp_path / "r"))
    assert code == 0, err
    assert out.startswith("held-out domain accuracy (last iteration): ")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert f"{metrics['target_acc']:.4f}" in out and f"{metrics['val_source']:.4f}" in out
    assert metrics["source_acc"] is None and metrics["name"] == "dg-beta_erm_bn_s0"
    # selection sees only the training domains: the target-reading validators stay empty
    assert metrics["val_source"] is not None
    assert metrics["val_entropy"] is metrics["val_snd"] is metrics["val_dev"] is None
    rows = log_rows(tmp_path / "r")
    assert [r["val_source"] != "" and r["val_entropy"] == "" for r in rows] == [True, True]
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg = info["config"]
    assert (cfg["setting"], cfg["method"], cfg["source"], cfg["target"]) == (
        "dg", "source-only", None, TARGET)
    assert info["data"]["domains"] == ["alpha", "gamma"] and info["data"]["held_out"] == TARGET


def _one_domain_tree(tmp_path: Path) -> Path:
    root = tmp_path / "solo"
    for label in range(2):
        (root / "only" / f"c{label}").mkdir(parents=True)
        Image.new("RGB", (20, 20), (200 * label, 0, 0)).save(root / "only" / f"c{label}" / "0.png")
    return root


@pytest.mark.parametrize("extra,code,expect", [
    (["--target", "beta", "--method", "dann"], 1,
     "a dg run is source-only (ERM), got --method dann: dann trains on target images"),
    (["--target", "beta", "--norm", "dsbn"], 1,
     ("--norm dsbn needs each training image's domain (source or target): a dg run has no "
      "target domain to train")),
    (["--target", "delta"], 1, "unknown domain 'delta' for dataset folder"),
    ([], 2, "a dg run needs --target"),
    (["--target", "beta", "--adabn"], 1, ("--adabn re-estimates the norm statistics on the "
                                           "target's images, which a dg run never reads")),
    (["--target", "beta", "--source", "alpha"], 2, "No such option: --source"),
    ("one domain", 1, "dg needs a dataset with at least 2 domains"),
])
def test_cli_dg_bad_input_is_one_line(tree, tmp_path, run_cli, extra, code, expect):
    if extra == "one domain":
        args = _dg_args(_one_domain_tree(tmp_path), "--target", "only")
    else:
        args = _dg_args(tree, *extra)
    got, _out, err = run_cli(*args, "--out", tmp_path / "r", "--quiet")
    assert got == code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


# -- sweeps --------------------------------------------------------------------------------------

def _plan(tree: Path, **kw):
    grid = {"dataset": "folder", "root": str(tree), "tasks": "none",
            "methods": "source-only,dann", "norms": "bn,bin", "seeds": "0,1",
            "multidomain": False, "dg": True} | kw
    return plan_sweep(**grid)


def test_sweep_dg_plans_one_cell_per_held_out_domain_norm_and_seed(tree, tmp_path):
    plan = _plan(tree)
    cells = [(c.seed, c.setting, c.method, c.source, c.target, c.norm) for c in plan.configs]
    assert cells == [(seed, "dg", "source-only", None, d, n)
                     for seed in (0, 1) for d in DOMAINS for n in ("bn", "bin")]
    assert {c.source_val_fraction for c in plan.configs} == {0.2}
    assert plan.layout.dg and not plan.layout.tasks and plan.record["dg"] is True
    # beside the transfer and multi-domain cells, closing each seed
    both = _plan(tree, tasks="alpha:beta", methods="dann", norms="bin", seeds="3",
                 multidomain=True)
    assert [(c.setting, c.target) for c in both.configs] == [
        ("transfer", "beta"), ("multidomain", None), ("dg", "alpha"), ("dg", "beta"),
        ("dg", "gamma")]
    assert both.configs[0].source_val_fraction == 0.0  # the transfer cells' default is kept
    without = _plan(tree, tasks="alpha:beta", dg=False)
    assert {c.setting for c in without.configs} == {"transfer"} and not without.layout.dg
    with pytest.raises(UserError, match="the grid is empty"):
        _plan(tree, dg=False)
    with pytest.raises(UserError, match="dg needs a dataset with at least 2 domains"):
        _plan(_one_domain_tree(tmp_path))


def test_sweep_dg_trains_the_cells_and_writes_the_dg_table(tree, tmp_path, run_cli):
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(
        "sweep", "--preset", "styledigits", "--dataset", "folder", "--root", tree,
        "--tasks", "none", "--dg", "--norms", "bn", "--seeds", "0", "--iters", "2",
        "--eval-every", "2", "--checkpoint-every", "2", "--batch-size", "6", "--workers", "1",
        "--out", out)
    assert code == 0, err
    assert "3 cells: 3 ran" in stdout
    table = read_table(out / "dg_table.csv")
    assert table.index.name == "held-out domain" and list(table.columns) == ["bn"]
    assert list(table.index) == [*DOMAINS, "Avg"]
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs.task) == list(DOMAINS) and (runs.setting == "dg").all()
    for row in runs.itertuples():
        assert table.at[row.task, "bn"] == f"{row.target_acc:.1f}"
    assert not (out / "transfer_table.csv").exists()
    code, _, err = run_cli("sweep", "--dataset", "folder", "--root", _one_domain_tree(tmp_path),
                           "--tasks", "none", "--dg", "--out", tmp_path / "s1")
    assert code == 2 and "at least 2 domains" in err and err.count("\n") == 1, err


# -- tables --------------------------------------------------------------------------------------

# held-out domain accuracy of each DG cell (norm), per seed
DG_ACC = {("Alpha", "bn"): (0.60, 0.62), ("Alpha", "bin"): (0.70, 0.66),
          ("Beta", "bn"): (0.50, 0.50), ("Beta", "bin"): (0.45, 0.47),
          ("Gamma", "bn"): (0.80, 0.84), ("Gamma", "bin"): (0.85, 0.85)}


def dg_cell(target: str, norm: str, seed: int) -> RunConfig:
    return make_config(dataset="toy", setting="dg", target=target, method="source-only",
                       norm=norm, seed=seed, iters=10)


def write_dg_runs(sweep_dir: Path, *, logs: bool = False) -> list[Path]:
    dirs = []
    for (target, norm), accs in DG_ACC.items():
        for seed, acc in enumerate(accs):
            run_dir = write_run(sweep_dir, dg_cell(target, norm, seed), {"target_acc": acc})
            if logs:  # iter 5 has the better held-out training-domain accuracy
                RunDir(run_dir).write_log([
                    {"iter": 5, "target_acc": acc - 0.1, "val_source": 0.9, "val_entropy": None},
                    {"iter": 10, "target_acc": acc, "val_source": 0.8, "val_entropy": None}])
            dirs.append(run_dir)
    return dirs


def test_dg_table_beside_transfer_and_multidomain(full_sweep):  # noqa: F811
    def tables() -> dict[str, str]:  # the notes' provenance counts name every run: left out
        return {name: "".join(line for line in (full_sweep / name).read_text().splitlines(True)
                              if not name.endswith(".md") or line.startswith("|"))
                for name in ("transfer_table.csv", "transfer_table.md", "multidomain_table.csv",
                             "multidomain_table.md")}

    write_tables(full_sweep)
    before = tables()
    comparison = pd.read_csv(full_sweep / "comparison.csv")
    record = json.loads((full_sweep / "sweep.json").read_text())
    dirs = [full_sweep / r for r in record["runs"]] + write_dg_runs(full_sweep)
    layout = Layout.from_dict({**record["layout"], "dg": True})
    write_record(full_sweep, dirs, layout)
    write_tables(full_sweep)
    # the other settings' tables and tests are untouched by the DG runs
    assert tables() == before
    again = pd.read_csv(full_sweep / "comparison.csv")
    pd.testing.assert_frame_equal(again[again.setting != "dg"].reset_index(drop=True),
                                  comparison)

    t = read_table(full_sweep / "dg_table.csv")
    assert t.index.name == "held-out domain"
    assert list(t.index) == ["Alpha", "Beta", "Gamma", "Avg", "BIN >= BN"]
    assert list(t.columns) == ["bn", "bin", "BIN - BN"]
    assert (t.at["Alpha", "bn"], t.at["Alpha", "bin"], t.at["Alpha", "BIN - BN"]) == (
        "61.0 ± 1.4", "68.0 ± 2.8", "+7.0")
    assert (t.at["Beta", "bin"], t.at["Beta", "BIN - BN"]) == ("46.0 ± 1.4", "-4.0")
    # Avg: per seed the mean over held-out domains, then mean ± std over seeds
    assert (t.at["Avg", "bn"], t.at["Avg", "bin"], t.at["Avg", "BIN - BN"]) == (
        "64.3 ± 1.4", "66.3 ± 0.5", "+2.0")
    # the domains' mean differences (7, -4, 3): W = 2, exact two-sided p = 2 x 3/8
    assert t.at["BIN >= BN", "BIN - BN"] == "2/3 (p=0.75, n=3)"
    dg = again[again.setting == "dg"].set_index("task")
    assert set(dg.comparison) == {"norm bin - bn"} and set(dg.within) == {"method=source-only"}
    assert list(dg.index) == ["Alpha", "Beta", "Gamma", "all", "task means"]
    assert dg.at["Alpha", "n"] == 2 and dg.at["Alpha", "mean_diff"] == pytest.approx(7.0)
    assert dg.at["all", "n"] == 6 and dg.at["task means", "n"] == 3
    assert dg.at["task means", "mean_diff"] == pytest.approx(2.0)
    md = (full_sweep / "dg_table.md").read_text()
    assert md.startswith("# Domain generalization accuracy (%) on toy")
    assert "never read an image of the held-out domain" in md
    assert "## Domain generalization" in (full_sweep / "comparison.md").read_text()
    runs = pd.read_csv(full_sweep / "runs.csv")
    dg_runs = runs[runs.setting == "dg"]
    assert len(dg_runs) == 12 and (dg_runs.task == dg_runs.target).all()
    assert dg_runs.source.isna().all()
    summary = pd.read_csv(full_sweep / "summary.csv")
    assert set(summary[summary.setting == "dg"]["row"]) == {"Alpha", "Beta", "Gamma", "Avg"}


def test_dg_tables_select_by_training_domain_validation(tmp_path):
    """Without sweep.json the layout comes from the runs (dg found); --select source reports
    the evaluation with the best held-out training-domain accuracy; the target-reading rules
    have nothing to select with."""
    write_dg_runs(tmp_path, logs=True)
    write_tables(tmp_path)
    write_tables(tmp_path, select="source")
    t = read_table(tmp_path / "dg_table_select-source.csv")
    assert t.at["Alpha", "bn"] == "51.0 ± 1.4"  # iter 5: each accuracy - 10 points
    assert read_table(tmp_path / "dg_table.csv").at["Alpha", "bn"] == "61.0 ± 1.4"
    with pytest.raises(UserError, match="--select entropy needs val_entropy"):
        write_tables(tmp_path, select="entropy")
    selection = pd.read_csv(tmp_path / "selection_table.csv")
    assert set(selection.rule) == {"last", "source", "oracle (uses target labels)"}


def test_sweep_leaves_out_the_cells_the_protocol_refuses_and_says_why(tree):
    # dsbn needs a target domain: no source-only cell, no dg cell; dann x dsbn transfer stays
    plan = _plan(tree, tasks="alpha:beta", methods="source-only,dann", norms="bn,dsbn",
                 seeds="0")
    cells = [(c.setting, c.method, c.norm) for c in plan.configs]
    assert ("transfer", "dann", "dsbn") in cells and ("transfer", "source-only", "bn") in cells
    assert not any(n == "dsbn" and (m == "source-only" or s == "dg") for s, m, n in cells)
    left = {item["reason"]: item["cells"] for item in plan.record["left_out"]}
    assert sum(left.values()) == 1 + len(DOMAINS)  # source-only transfer + every dg cell
    assert all(reason.startswith("--norm dsbn needs") for reason in left)
    assert "left_out" not in _plan(tree).record  # nothing refused: no entry
    # the columns without a cell are in the layout (sweep.json), so the tables leave them out
    assert plan.layout.left_out == (("dg", "source-only", "dsbn"),
                                    ("transfer", "source-only", "dsbn"))
    assert Layout.from_dict(json.loads(json.dumps(plan.layout.to_dict()))) == plan.layout
    with pytest.raises(UserError, match="no cell of the grid can run: --norm dsbn"):
        _plan(tree, norms="dsbn")


def test_tables_leave_out_the_columns_the_protocol_refuses(tree):
    layout = _plan(tree, tasks="alpha:beta", methods="source-only,dann", norms="bn,dsbn",
                   seeds="0").layout
    LABEL = layout.task_label("alpha", "beta")
    scores = pd.DataFrame(
        [("transfer", LABEL, m, n, seed, 50.0 + seed + (n == "dsbn"))
         for m, n in [("source-only", "bn"), ("dann", "bn"), ("dann", "dsbn")] for seed in (0, 1)]
        + [("dg", d, "source-only", "bn", seed, 60.0 + seed) for d in DOMAINS for seed in (0, 1)],
        columns=["setting", "row", "method", "norm", "seed", "acc"])
    _, transfer = transfer_tables(scores, layout)
    assert list(transfer.columns) == ["source-only/bn", "dann/bn", "dann/dsbn", "dann DSBN - BN"]
    assert transfer.at[LABEL, "dann DSBN - BN"] == "+1.0"
    _, dg = dg_tables(scores, layout)
    assert list(dg.columns) == ["bn"]  # dsbn has no dg cell: no empty column, no difference
    assert "DSBN >= BN" in transfer.index and list(dg.index)[-1] == "Avg"  # no count row
    assert count_label(layout, "transfer") == "DSBN >= BN"
    assert dg.at["Avg", "bn"] == "60.5 ± 0.7"
    # a layout without the field (sweep.json before it) shows every column, as before
    old = Layout.from_dict({k: v for k, v in layout.to_dict().items() if k != "left_out"})
    assert "source-only/dsbn" in transfer_tables(scores, old)[1].columns
