"""Hyper-parameter search (`sweep --n-hparams K --hparams-seed S`): search distributions, the
draws of each trial, and the tables' choice of a trial per cell (synthetic run records with
known numbers, then a tiny real sweep on styledigits)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from domadapt.config import RunConfig, make_config
from domadapt.distributions import Choice, LogUniform, Uniform, unit
from domadapt.errors import UserError
from domadapt.hparam_search import CORE_SEARCH, draw_trial, search_space, trial_configs
from domadapt.io import atomic_write_json
from domadapt.methods import METHODS
from domadapt.norms import NORMS
from domadapt.registry import hparam, hparam_specs, merged_specs
from domadapt.rundir import RunDir
from domadapt.tables import Layout, load_sweep, write_tables
from domadapt.tables.records import FinishedRun
from domadapt.tables.trials import choose_trials

ORACLE = "oracle (uses target labels)"


def cell(norm: str = "bin", seed: int = 0, method: str = "dann", **kw) -> RunConfig:
    return make_config("styledigits", source="gray", target="sketch", method=method, norm=norm,
                       seed=seed, **kw)


# -- distributions ------------------------------------------------------------------------------

@pytest.mark.parametrize("dist", [Uniform(-1.0, 2.0), LogUniform(1e-4, 0.1),
                                  Choice(16, 32, 64), Choice("a", "b")])
def test_draws_are_deterministic_and_inside(dist) -> None:
    us = [unit("t", i) for i in range(300)]
    assert all(0.0 <= u < 1.0 for u in us) and us == [unit("t", i) for i in range(300)]
    values = [dist.draw(u) for u in us]
    assert all(dist.contains(v) for v in values)
    assert [dist.draw(u) for u in (0.0, 0.999999999)] == [dist.draw(0.0), dist.draw(0.999999999)]
    if isinstance(dist, Choice):
        assert set(values) == set(dist.values)  # every value drawn
    else:
        assert len(set(values)) > 250 and dist.draw(0.0) == dist.low
        assert all(v == float(f"{v:.4g}") for v in values)  # 4 significant digits


def test_log_uniform_spreads_over_decades() -> None:
    values = [LogUniform(1e-3, 1e-1).draw(unit("d", i)) for i in range(2000)]
    below = sum(v < 1e-2 for v in values) / len(values)
    assert 0.45 < below < 0.55  # one decade each side of 1e-2


def test_bad_distributions() -> None:
    for make in (lambda: Uniform(1, 1), lambda: LogUniform(0, 1), lambda: Choice(),
                 lambda: Choice(1, 1), lambda: Uniform(0, math.inf)):
        with pytest.raises(ValueError):
            make()


def test_a_declared_search_must_fit_its_option() -> None:
    @dataclass(frozen=True)
    class Bad:
        steps: int = hparam(4, "steps", search=Uniform(1, 8))

    with pytest.raises(UserError, match=r"--steps \(int\) declares search=Uniform"):
        hparam_specs(Bad)

    @dataclass(frozen=True)
    class BadChoice:
        mode: str = hparam("a", "mode", choices=("a", "b"), search=Choice("a", "c"))

    with pytest.raises(UserError, match="'c', not one of its choices"):
        hparam_specs(BadChoice)


def test_shared_options_must_agree_on_their_search() -> None:
    @dataclass(frozen=True)
    class One:
        w: float = hparam(1.0, "w", search=LogUniform(0.1, 10.0))

    @dataclass(frozen=True)
    class Two:
        w: float = hparam(1.0, "w", search=LogUniform(0.1, 1.0))

    assert merged_specs([("method a", One), ("method b", One)])["w"][1] == ["method a",
                                                                            "method b"]
    with pytest.raises(UserError) as e:
        merged_specs([("method a", One), ("method b", Two)])
    assert "method a" in str(e.value) and "method b" in str(e.value)
    assert "\n" not in str(e.value) and "search LogUniform(0.1, 1)" in str(e.value)


def test_every_declared_search_draws_values_its_plugin_accepts() -> None:
    declared = 0
    for owners in (METHODS, NORMS):
        for name in owners.names():
            plugin = owners.get(name)
            for spec in hparam_specs(plugin.Hparams):
                if spec.search is None:
                    continue
                declared += 1
                for i in range(20):
                    value = spec.search.draw(unit("check", i))
                    assert spec.search.contains(value)
                    plugin.Hparams(**{spec.name: value})  # the plug-in's own range checks
    assert declared >= 3  # adv_weight, mcc_weight, gate_lr_mult
    for name in CORE_SEARCH:  # core settings the search draws are RunConfig fields
        assert name in RunConfig.__dataclass_fields__


# -- trials -------------------------------------------------------------------------------------

def test_trial_zero_is_the_defaults_with_the_same_key() -> None:
    base = cell()
    trials = trial_configs(base, 4, hparams_seed=7)
    assert trials[0] is base and trials[0].key() == cell().key()
    assert trials[0].hparams_trial is None and trials[0].hparams_seed is None
    assert "hparams" not in json.dumps({k: v for k, v in base.to_dict().items()
                                        if v is not None})
    assert len({t.key() for t in trials}) == 4  # distinct run keys
    assert [t.hparams_trial for t in trials[1:]] == [1, 2, 3]
    assert [t.name() for t in trials] == ["gray-sketch_dann_bin_s0", *(
        f"gray-sketch_dann_bin_s0_h{i}" for i in (1, 2, 3))]


def test_draws_are_reproducible_and_within_their_distributions() -> None:
    base = cell()
    first = trial_configs(base, 6, hparams_seed=3)
    assert [t.key() for t in first] == [t.key() for t in trial_configs(cell(), 6, 3)]
    assert [t.key() for t in first[:4]] == [t.key() for t in trial_configs(cell(), 4, 3)]
    other = trial_configs(base, 6, hparams_seed=4)
    assert {t.key() for t in first[1:]}.isdisjoint({t.key() for t in other[1:]})
    space = search_space(base)
    assert set(space) == {"lr", "weight_decay", "batch_size", "adv_weight", "gate_lr_mult"}
    for trial in first[1:]:
        values = {**trial.to_dict(), **trial.method_options, **trial.norm_options}
        assert all(space[k].contains(values[k]) for k in space)
        unsearched = {k: v for k, v in trial.to_dict().items()
                      if k not in space and k not in ("hparams_seed", "hparams_trial",
                                                      "method_options", "norm_options")}
        assert unsearched == {k: v for k, v in base.to_dict().items() if k in unsearched}
        assert trial.method_options["disc_hidden"] == base.method_options["disc_hidden"]
    # a trial is rebuilt from config.json exactly (resume finds the same run)
    assert RunConfig.from_dict(first[2].to_dict()).key() == first[2].key()


def test_draws_are_shared_across_cells_but_not_seeds() -> None:
    bn, bin_ = draw_trial(cell("bn"), 0, 2), draw_trial(cell("bin"), 0, 2)
    other_task = draw_trial(make_config("styledigits", source="color", target="gray",
                                        method="cdan", norm="bn"), 0, 2)
    for name in ("lr", "weight_decay", "batch_size"):
        assert getattr(bn, name) == getattr(bin_, name) == getattr(other_task, name)
    assert bn.method_options["adv_weight"] == other_task.method_options["adv_weight"]
    seed1 = draw_trial(cell("bn", seed=1), 0, 2)
    assert (seed1.lr, seed1.weight_decay) != (bn.lr, bn.weight_decay)


def test_explicit_options_are_held_fixed() -> None:
    base = cell(lr=0.02)
    trials = trial_configs(base, 3, 0, fixed={"lr"})
    assert [t.lr for t in trials] == [0.02] * 3 and trials[1].weight_decay != base.weight_decay
    with pytest.raises(UserError, match="nothing to search"):
        trial_configs(cell("bn", method="source-only"), 2, 0,
                      fixed={"lr", "weight_decay", "batch_size"})


def test_identical_draws_are_distinct_runs(monkeypatch) -> None:
    monkeypatch.setattr("domadapt.hparam_search.CORE_SEARCH", {"batch_size": Choice(32)})
    trials = trial_configs(cell("bn", method="source-only"), 3, 0)
    assert {t.batch_size for t in trials} == {32}
    assert len({t.key() for t in trials}) == 3


@pytest.mark.parametrize(("args", "message"), [
    (("--n-hparams", "0"), "--n-hparams must be an integer >= 1, got 0"),
    (("--hparams-seed", "-1"), "--hparams-seed must be an integer >= 0, got -1"),
    (("--n-hparams", "2", "--lr", "0.1", "--weight-decay", "0.01", "--batch-size", "8"),
     "nothing to search"),
])
def test_cli_bad_search_options_are_usage_errors(run_cli, tmp_path: Path, args, message) -> None:
    code, _, err = run_cli("sweep", "--dataset", "styledigits", "--tasks", "G:C", "--methods",
                           "source-only", "--norms", "bn", "--out", tmp_path / "s", *args)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


# -- choosing a trial per cell: synthetic run records ----------------------------------------

LAYOUT = Layout(dataset="toy", domains=("Alpha", "Beta"), short_names={"Alpha": "Al",
                                                                       "Beta": "Be"},
                tasks=(("Alpha", "Beta"),), methods=("dann",), norms=("bn", "bin"))
# per trial: (iter 10, iter 20) of target_acc (fractions; + seed/100, + 0.05 for bin),
# val_snd and val_entropy. last -> trial 0 at 20 (0.55); snd -> trial 2 at 10 (0.60);
# entropy -> trial 1 at 10 (0.52); oracle -> trial 1 at 20 (0.70)
TRIAL_LOGS = {0: ((0.50, 0.55), (1.0, 2.0), (0.5, 0.4)),
              1: ((0.52, 0.70), (1.5, 2.5), (0.1, 0.3)),
              2: ((0.60, 0.58), (3.0, 1.0), (0.6, 0.5))}
EXPECTED = {"last": 0.55, "snd": 0.60, "entropy": 0.52, "oracle": 0.70}
CHOSEN = {"last": 0, "snd": 2, "entropy": 1, "oracle": 1}


def trial_log(trial: int, shift: float) -> list[dict]:
    acc, snd, ent = TRIAL_LOGS[trial]
    return [{"iter": it, "target_acc": acc[i] + shift, "val_source": None,
             "val_entropy": ent[i], "val_snd": snd[i], "val_dev": None}
            for i, it in enumerate((10, 20))]


def write_run(sweep: Path, cfg: RunConfig, log: list[dict]) -> Path:
    run = RunDir(sweep / "runs" / f"{cfg.name()}-{cfg.key()}")
    atomic_write_json(run.config_path, {"config": cfg.to_dict(), "key": cfg.key(),
                                        "name": cfg.name()})
    run.write_log(log)
    run.write_metrics({"target_acc": log[-1]["target_acc"], "iters": cfg.iters,
                       "wall_seconds": 1.0})
    return run.path


def search_sweep(sweep: Path, trials: int = 3, record_search: bool = True) -> Path:
    dirs = []
    for seed in (0, 1):
        for norm in ("bn", "bin"):
            base = make_config(dataset="toy", source="Alpha", target="Beta", method="dann",
                               norm=norm, seed=seed, iters=20)
            for cfg in trial_configs(base, trials, hparams_seed=0):
                shift = seed / 100 + (0.05 if norm == "bin" else 0.0)
                dirs.append(write_run(sweep, cfg, trial_log(cfg.hparams_trial or 0, shift)))
    record = {"command": "domadapt sweep --dataset toy", "layout": LAYOUT.to_dict(),
              "runs": [str(d.relative_to(sweep)) for d in dirs]}
    if record_search and trials > 1:
        record["hparams"] = {"n_hparams": trials, "hparams_seed": 0}
    atomic_write_json(sweep / "sweep.json", record)
    return sweep


@pytest.mark.parametrize("rule", ["last", "snd", "entropy", "oracle"])
def test_tables_choose_the_trial_by_the_rule(tmp_path: Path, rule: str) -> None:
    sweep = search_sweep(tmp_path / "sweep")
    write_tables(sweep, select=rule)
    sfx = "" if rule == "last" else f"_select-{rule}"
    summary = pd.read_csv(sweep / f"summary{sfx}.csv")
    summary = summary[summary["row"] == "Al->Be"].set_index("norm")
    for norm, shift in (("bn", 0.0), ("bin", 5.0)):
        assert summary.at[norm, "mean"] == pytest.approx(100 * EXPECTED[rule] + shift + 0.5)
        assert summary.at[norm, "n_seeds"] == 2
    comparison = pd.read_csv(sweep / f"comparison{sfx}.csv")
    assert comparison["mean_diff"].dropna().round(6).eq(5.0).all()  # BIN vs BN, chosen trials
    trials = pd.read_csv(sweep / "trials.csv", keep_default_na=False)
    assert len(trials) == 12 and sorted(set(trials["hparams_trial"])) == [0, 1, 2]
    assert {"lr", "weight_decay", "batch_size", "adv_weight"} <= set(trials.columns)
    label = ORACLE if rule == "oracle" else rule
    chosen = trials[trials["chosen_by"].str.split("; ").map(lambda c: label in c)]
    assert len(chosen) == 4 and set(chosen["hparams_trial"]) == {CHOSEN[rule]}
    runs = pd.read_csv(sweep / "runs.csv")
    assert len(runs) == 12 and list(runs.columns).index("hparams_trial") == list(
        runs.columns).index("seed") + 1
    note = (sweep / f"transfer_table{sfx}.md").read_text()
    assert "Hyper-parameter search: 3 configurations per cell" in note
    if rule == "oracle":
        assert "evaluation selected by oracle (uses target labels)" in note
        assert "USES TARGET LABELS" in note
    if rule != "last":
        picked = pd.read_csv(sweep / f"runs{sfx}.csv")
        assert len(picked) == 4 and all(f"_h{CHOSEN[rule]}-" in d for d in picked["run_dir"])


def test_selection_table_compares_the_rules_across_trials(tmp_path: Path) -> None:
    sweep = search_sweep(tmp_path / "sweep")
    write_tables(sweep)
    sel = pd.read_csv(sweep / "selection_table.csv").set_index(["rule", "norm"])
    oracle = 100 * EXPECTED["oracle"] + 0.5
    for rule in ("last", "snd", "entropy"):
        acc = 100 * EXPECTED[rule] + 0.5
        assert sel.at[(rule, "bn"), "target_acc"] == pytest.approx(acc)
        assert sel.at[(rule, "bn"), "regret"] == pytest.approx(oracle - acc)
    assert sel.at[(ORACLE, "bn"), "regret"] == 0 and bool(
        sel.at[(ORACLE, "bn"), "uses_target_labels"])
    assert "source" not in {r for r, _ in sel.index}  # not recorded: left out
    assert "oracle across trials" in (sweep / "selection_table.md").read_text()


def test_default_tables_equal_a_sweep_of_the_defaults(tmp_path: Path) -> None:
    """`last` chooses no trial: the tables of trial 0, as a sweep without search."""
    search = search_sweep(tmp_path / "search")
    plain = search_sweep(tmp_path / "plain", trials=1)
    write_tables(search)
    write_tables(plain)
    for name in ("transfer_table.csv", "summary.csv", "comparison.csv", "stability.csv",
                 "trajectory.csv"):
        assert (search / name).read_text() == (plain / name).read_text(), name
    assert not (plain / "trials.csv").exists()
    _, runs, _ = load_sweep(search)  # other readers (evidence, knockout): the defaults
    assert len(runs) == 4 and all(r.config.get("hparams_trial") is None for r in runs)
    assert len(load_sweep(search, trials=True)[1]) == 12


def test_a_cell_is_chosen_once_all_its_trials_finished(tmp_path: Path) -> None:
    sweep = search_sweep(tmp_path / "sweep")
    record = json.loads((sweep / "sweep.json").read_text())
    record["runs"] = [r for r in record["runs"] if "_s1_h2-" not in r]  # seed 1 waits
    atomic_write_json(sweep / "sweep.json", record)
    write_tables(sweep, select="snd")
    summary = pd.read_csv(sweep / "summary_select-snd.csv")
    summary = summary[summary["row"] == "Al->Be"].set_index("norm")
    assert (summary["n_seeds"] == 1).all()  # seed 0 only
    assert summary.at["bn", "mean"] == pytest.approx(100 * EXPECTED["snd"])
    assert "2 cell(s) wait for all 3 trials" in (sweep / "transfer_table_select-snd.md"
                                                  ).read_text()
    trials = pd.read_csv(sweep / "trials.csv", keep_default_na=False)
    waiting = trials[trials["seed"] == 1]
    assert set(waiting["chosen_by"]) == {"last", ""}  # trial 0 is the defaults already
    assert "wait for all 3 trials" in (sweep / "selection_table.md").read_text()


def test_versus_pairs_the_chosen_trials(tmp_path: Path) -> None:
    from domadapt.tables import write_versus

    a = search_sweep(tmp_path / "a")
    b = search_sweep(tmp_path / "b")
    write_versus(a, b, tmp_path / "v", select="snd")
    table = pd.read_csv(tmp_path / "v" / "versus.csv")
    assert (table["mean_a"].dropna() == table["mean_b"].dropna()).all()
    assert set(table["mean_a"].round(4)) >= {60.5, 65.5}


def test_multidomain_cells_choose_their_trial_too(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    layout = Layout(dataset="toy", domains=("Alpha", "Beta"), short_names={"Alpha": "Al",
                                                                           "Beta": "Be"},
                    tasks=(), methods=("source-only",), norms=("bn",), multidomain=True)
    base = make_config(dataset="toy", setting="multidomain", method="source-only", norm="bn",
                       iters=20)
    dirs = []
    for cfg in trial_configs(base, 3, 0):
        log = trial_log(cfg.hparams_trial or 0, 0.0)
        for row in log:
            row.update(acc_Alpha=row["target_acc"] + 0.1, acc_Beta=row["target_acc"] - 0.1)
        run = RunDir(write_run(sweep, cfg, log))
        run.write_metrics({**run.read_metrics(), "avg_acc": log[-1]["target_acc"],
                           "domain_acc": {"Alpha": log[-1]["acc_Alpha"],
                                          "Beta": log[-1]["acc_Beta"]}})
        dirs.append(run.path)
    atomic_write_json(sweep / "sweep.json", {
        "command": "c", "layout": layout.to_dict(), "hparams": {"n_hparams": 3},
        "runs": [str(d.relative_to(sweep)) for d in dirs]})
    for rule in ("last", "snd"):
        write_tables(sweep, select=rule)
        sfx = "" if rule == "last" else f"_select-{rule}"
        table = pd.read_csv(sweep / f"multidomain_table{sfx}.csv", index_col=0, dtype=str)
        assert table.at["Alpha", "bn"] == f"{100 * EXPECTED[rule] + 10:.1f}"
        assert table.at["Beta", "bn"] == f"{100 * EXPECTED[rule] - 10:.1f}"


def finished(cfg: RunConfig, log: list[dict]) -> FinishedRun:
    return FinishedRun(Path(f"/runs/{cfg.name()}"), cfg.to_dict(), cfg.key(),
                       {"target_acc": log[-1]["target_acc"]}, pd.DataFrame(log))


def test_choice_ties_go_to_the_lower_trial_and_waits_for_every_trial() -> None:
    trials = trial_configs(make_config(dataset="toy", source="Alpha", target="Beta",
                                       method="dann", norm="bn", iters=20), 3, 0)
    logs = [trial_log(t, 0.0) for t in range(3)]
    logs[1][0]["val_snd"] = 3.0  # trial 1 ties trial 2's best snd
    runs = [finished(c, log) for c, log in zip(trials, logs, strict=True)]
    assert choose_trials(runs, "snd")[0].config["hparams_trial"] == 1
    assert choose_trials(runs[::-1], "snd")[0].config["hparams_trial"] == 1
    assert choose_trials(runs[:2], "snd", n_hparams=3) == []  # trial 2 not finished
    assert choose_trials(runs[1:], "last") == []  # no trial 0 yet
    assert choose_trials(runs, "source")[0] is runs[0]  # not recorded: trial 0, rule refuses
    no_log = [FinishedRun(r.run_dir, r.config, r.key, r.metrics, None) for r in runs]
    with pytest.raises(UserError, match="needs each run's log.csv"):
        choose_trials(no_log, "snd")


# -- a tiny real sweep -------------------------------------------------------------------------

TINY = ["--iters", "2", "--eval-every", "1", "--checkpoint-every", "2", "--batch-size", "8",
        "--image-size", "16", "--resize-size", "18", "--eval-max-images", "40", "--device",
        "cpu"]


def test_sweep_with_two_trials_runs_and_the_tables_choose(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "--dataset", "styledigits", "--preset", "styledigits", "--tasks", "G:C",
            "--methods", "source-only", "--norms", "bn,bin", "--n-hparams", "2",
            "--hparams-seed", "5", "--out", out, *TINY]
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert "4 cells: 4 ran" in stdout
    record = json.loads((out / "sweep.json").read_text())
    assert record["hparams"] == {"n_hparams": 2, "hparams_seed": 5}
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and runs.run_key.is_unique
    assert sorted(runs.hparams_trial) == [0, 0, 1, 1]
    configs = {d: json.loads((out / d / "config.json").read_text())["config"]
               for d in runs.run_dir}
    plain = make_config("styledigits", dataset="styledigits", source="gray", target="color",
                        method="source-only", norm="bn", iters=2, eval_every=1,
                        checkpoint_every=2, batch_size=8, image_size=16, resize_size=18,
                        eval_max_images=40)
    zero = runs[(runs.hparams_trial == 0) & (runs.norm == "bn")].run_key.item()
    assert zero == plain.replace(root=configs[runs.run_dir[0]]["root"]).key()
    for d, cfg in configs.items():
        assert cfg["batch_size"] == 8  # given explicitly: held fixed
        if cfg["hparams_trial"]:
            assert d.endswith(f"_h1-{runs.set_index('run_dir').at[d, 'run_key']}")
            assert cfg["lr"] != 0.05 and cfg["hparams_seed"] == 5
    trials = pd.read_csv(out / "trials.csv", keep_default_na=False)
    assert len(trials) == 4 and "lr" in trials.columns

    code, _, err = run_cli("tables", out, "--select", "snd")
    assert code == 0, err
    picked = pd.read_csv(out / "runs_select-snd.csv")
    for norm in ("bn", "bin"):  # the best val_snd over both trials' evaluations
        logs = pd.concat([pd.read_csv(out / d / "log.csv").assign(run_dir=d)
                          for d in runs[runs.norm == norm].run_dir])
        best = logs.sort_values(["val_snd", "iter"], ascending=[False, True]).iloc[0]
        row = picked[picked.norm == norm].iloc[0]
        assert row.run_dir == best.run_dir and row["iter"] == best["iter"]
        assert row.target_acc == pytest.approx(100 * best.target_acc)
    assert len(pd.read_csv(out / "comparison_select-snd.csv")) > 0

    code, stdout, err = run_cli(*args)  # resumable: the same draws, the same run keys
    assert code == 0, err
    assert "4 cells: 0 ran, 4 were done" in stdout
