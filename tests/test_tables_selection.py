"""`domadapt tables --select`: per-run model selection, the selection table and the paired
statistics (comparison.csv), on a sweep written by hand with known numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from domadapt.config import RunConfig, make_config
from domadapt.io import atomic_write_json
from domadapt.rundir import RunDir
from domadapt.tables import Layout, write_tables

T_975_DF2 = 4.302652729911275  # Student t quantile t_{0.975, 2}
ORACLE = "oracle (uses target labels)"
LAYOUT = Layout(dataset="toy", domains=("Alpha", "Beta", "Gamma"),
                short_names={"Alpha": "Al", "Beta": "Be", "Gamma": "Ga"},
                tasks=(("Alpha", "Beta"), ("Beta", "Alpha")), methods=("dann",),
                norms=("bn", "bin"), multidomain=True)
TASKS = {"Al->Be": ("Alpha", "Beta"), "Be->Al": ("Beta", "Alpha")}
# bin - bn at the LAST evaluation, per (task, seed): known by construction, |d| all distinct
D = {("Al->Be", 0): 1.0, ("Al->Be", 1): 2.0, ("Al->Be", 2): 3.0,
     ("Be->Al", 0): -1.5, ("Be->Al", 1): 4.0, ("Be->Al", 2): 5.0}


def base(task: str, seed: int) -> float:
    """bn's last target accuracy (percent)."""
    return 50.0 + 2 * seed + (10.0 if task == "Be->Al" else 0.0)


def transfer_log(last: float, norm: str, holdout: bool = True) -> list[dict]:
    """Three evaluations (iters 10, 20, 30) that each rule tells apart: source and snd prefer
    iter 10 (last - 10), entropy and dev iter 20 (bn: last + 5, bin: last - 3), last iter 30;
    the oracle takes iter 20 for bn and iter 30 for bin. Accuracies in percent here, fractions
    in the file. Without `holdout`, val_source and val_dev are empty (as in the engine)."""
    at20 = last + (5.0 if norm == "bn" else -3.0)
    rows = []
    for it, acc, src, ent, snd, dev in [(10, last - 10, 0.9, 0.8, 3.0, 0.7),
                                        (20, at20, 0.8, 0.2, 2.0, 0.1),
                                        (30, last, 0.7, 0.5, 1.0, 0.4)]:
        rows.append({"iter": it, "cls_loss": 1.0, "source_acc": 0.9, "target_acc": acc / 100,
                     "val_source": src if holdout else None, "val_entropy": ent,
                     "val_snd": snd, "val_dev": dev if holdout else None, "lr": 0.01})
    return rows


# multi-domain (seed 0): per-domain accuracies at iters 10, 20, 30; target_acc = their mean
MD_LOG = {
    "bn": [(0.6, 0.7, 0.8), (0.9, 0.8, 0.7), (0.7, 0.7, 0.7)],
    "bin": [(0.5, 0.6, 0.7), (0.95, 0.85, 0.75), (0.8, 0.8, 0.8)],
}


def write_run(sweep: Path, cfg: RunConfig, metrics: dict, log: list[dict] | None) -> Path:
    run = RunDir(sweep / "runs" / f"{cfg.name()}-{cfg.key()}")
    atomic_write_json(run.config_path, {"config": cfg.to_dict(), "key": cfg.key(),
                                        "name": cfg.name()})
    if log is not None:
        run.write_log(log)
    run.write_metrics({"wall_seconds": 1.0, "iters": cfg.iters, **metrics})
    return run.path


def make_sweep(sweep: Path, *, holdout: bool = True, no_log: bool = False,
               old_log: bool = False, md_holdout: bool | None = None) -> Path:
    """2 tasks x {bn, bin} x seeds 0-2 (dann) + multi-domain bn/bin seed 0. `no_log`: one run
    lost its log.csv (a committed record); `old_log`: one run's log predates the val_* columns;
    `md_holdout` (default `holdout`): whether the multi-domain runs logged val_source/val_dev."""
    md_holdout = holdout if md_holdout is None else md_holdout
    dirs = []
    for (task, seed), d in D.items():
        for norm in ("bn", "bin"):
            last = base(task, seed) + (d if norm == "bin" else 0.0)
            log = transfer_log(last, norm, holdout)
            if old_log and (task, seed, norm) == ("Al->Be", 0, "bn"):
                log = [{k: v for k, v in r.items() if not k.startswith("val_")} for r in log]
            if no_log and (task, seed, norm) == ("Be->Al", 2, "bin"):
                log = None
            cfg = make_config(dataset="toy", setting="transfer", source=TASKS[task][0],
                              target=TASKS[task][1], method="dann", norm=norm, seed=seed,
                              iters=30)
            dirs.append(write_run(sweep, cfg, {"target_acc": last / 100}, log))
    for norm, evals in MD_LOG.items():
        log = [{"iter": 10 * (i + 1), "target_acc": sum(acc) / 3,
                "val_source": 0.9 - 0.1 * i if md_holdout else None,
                "val_entropy": [0.8, 0.2, 0.5][i], "val_snd": 3.0 - i,
                "val_dev": [0.7, 0.1, 0.4][i] if md_holdout else None,
                **{f"acc_{d}": a for d, a in zip(LAYOUT.domains, acc, strict=True)}}
               for i, acc in enumerate(evals)]
        cfg = make_config(dataset="toy", setting="multidomain", method="source-only", norm=norm,
                          seed=0, iters=30)
        dirs.append(write_run(sweep, cfg, {"target_acc": sum(evals[-1]) / 3,
                                           "avg_acc": sum(evals[-1]) / 3,
                                           "domain_acc": dict(zip(LAYOUT.domains, evals[-1],
                                                                  strict=True))}, log))
    atomic_write_json(sweep / "sweep.json", {
        "command": "domadapt sweep --dataset toy", "layout": LAYOUT.to_dict(),
        "runs": [str(d.relative_to(sweep)) for d in dirs]})
    return sweep


def table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)


def mean_std(values: list[float]) -> str:
    s = pd.Series(values)
    return f"{s.mean():.1f} ± {s.std(ddof=1):.1f}"


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path / "sweep")


@pytest.mark.parametrize(("rule", "bn_shift", "bin_shift"), [
    ("last", 0.0, 0.0),        # iter 30 for both
    ("entropy", 5.0, -3.0),    # iter 20
    ("dev", 5.0, -3.0),        # iter 20
    ("source", -10.0, -10.0),  # iter 10
    ("snd", -10.0, -10.0),     # iter 10
    ("oracle", 5.0, 0.0),      # bn: iter 20, bin: iter 30
])
def test_select_reports_the_chosen_evaluation(sweep: Path, rule: str, bn_shift: float,
                                              bin_shift: float) -> None:
    write_tables(sweep, select=rule)
    sfx = "" if rule == "last" else f"_select-{rule}"
    t = table(sweep / f"transfer_table{sfx}.csv")
    for task in TASKS:
        bn = [base(task, s) + bn_shift for s in range(3)]
        bin_ = [base(task, s) + D[task, s] + bin_shift for s in range(3)]
        assert t.at[task, "dann/bn"] == mean_std(bn)
        assert t.at[task, "dann/bin"] == mean_std(bin_)
    if rule != "last":
        picked = pd.read_csv(sweep / f"runs{sfx}.csv")
        assert len(picked) == 14 and set(picked["selected_by"]) == {
            ORACLE if rule == "oracle" else rule}
        expected = {"last": 30, "entropy": 20, "dev": 20, "source": 10, "snd": 10}
        iters = picked.set_index(["setting", "norm"])["iter"]
        if rule == "oracle":
            assert set(iters.loc[("transfer", "bn")]) == {20}
            assert set(iters.loc[("transfer", "bin")]) == {30}
        else:
            assert set(picked["iter"]) == {expected[rule]}


@pytest.mark.parametrize(("rule", "row"), [("last", 2), ("oracle", 1), ("source", 0)])
def test_multidomain_per_domain_numbers_follow_the_chosen_row(sweep: Path, rule: str,
                                                              row: int) -> None:
    write_tables(sweep, select=rule)
    m = table(sweep / ("multidomain_table.csv" if rule == "last"
                       else f"multidomain_table_select-{rule}.csv"))
    for norm, evals in MD_LOG.items():
        for domain, acc in zip(LAYOUT.domains, evals[row], strict=True):
            assert m.at[domain, norm] == f"{100 * acc:.1f}"


def test_oracle_is_labelled_and_last_files_are_left_alone(sweep: Path) -> None:
    write_tables(sweep)
    before = {p.name: p.read_text() for p in sweep.glob("*_table.*")}
    written = {p.name for p in write_tables(sweep, select="oracle")}
    assert {"transfer_table_select-oracle.md", "multidomain_table_select-oracle.csv",
            "comparison_select-oracle.md", "summary_select-oracle.csv",
            "runs_select-oracle.csv"} <= written
    assert not written & set(before) - {"selection_table.csv", "selection_table.md"}
    assert {p.name: p.read_text() for p in sweep.glob("*_table.*")} == before
    for name in ("transfer_table_select-oracle.md", "multidomain_table_select-oracle.md",
                 "comparison_select-oracle.md"):
        md = (sweep / name).read_text()
        assert md.splitlines()[0].endswith("selected by oracle (uses target labels)")
        assert "USES TARGET LABELS" in md
    last_md = (sweep / "transfer_table.md").read_text()
    assert last_md.startswith("# Transfer accuracy (%) on toy\n")
    assert "no target labels used" in last_md and "target labels)" not in last_md


def test_selection_table_means_and_regrets(sweep: Path) -> None:
    write_tables(sweep, select="entropy")  # the selection table does not depend on --select
    sel = pd.read_csv(sweep / "selection_table.csv")
    tr = sel[sel.setting == "transfer"].set_index(["rule", "norm"])
    # mean of base over tasks x seeds = 57, of d = 13.5 / 6 = 2.25; oracle: bn 62, bin 59.25
    expected = {  # (rule, norm): (mean target acc %, regret)
        ("last", "bn"): (57.0, 5.0), ("last", "bin"): (59.25, 0.0),
        ("entropy", "bn"): (62.0, 0.0), ("entropy", "bin"): (56.25, 3.0),
        ("dev", "bin"): (56.25, 3.0), ("snd", "bn"): (47.0, 15.0),
        ("source", "bin"): (49.25, 10.0), (ORACLE, "bn"): (62.0, 0.0),
        (ORACLE, "bin"): (59.25, 0.0),
    }
    for key, (acc, regret) in expected.items():
        assert tr.at[key, "target_acc"] == pytest.approx(acc)
        assert tr.at[key, "regret"] == pytest.approx(regret)
        assert tr.at[key, "runs"] == 6
    assert tr.at[(ORACLE, "bn"), "uses_target_labels"]
    assert not tr.at[("snd", "bn"), "uses_target_labels"]
    md_sel = sel[sel.setting == "multidomain"].set_index(["rule", "norm"])
    # bn: iters 10, 20, 30 have means 0.7, 0.8, 0.7; oracle 80, source 70 -> regret 10
    assert md_sel.at[("source", "bn"), "regret"] == pytest.approx(10.0)
    md = (sweep / "selection_table.md").read_text()
    assert "| oracle (uses target labels) |" in md.replace("  ", " ").replace("  ", " ")
    assert "57.0 (5.0)" in md and "USES TARGET LABELS" in md


def test_comparison_ci_and_p_value_by_hand(sweep: Path) -> None:
    write_tables(sweep)
    c = pd.read_csv(sweep / "comparison.csv", keep_default_na=False, na_values=[""])
    tr = c[(c.setting == "transfer") & (c.comparison == "norm bin - bn")].set_index("task")
    assert list(tr.index) == ["Al->Be", "Be->Al", "all", "task means"]
    assert set(tr.within) == {"method=dann"}
    # Al->Be: d = (1, 2, 3): mean 2, sd 1 -> 2 -+ t_{0.975,2} / sqrt(3)
    assert tr.at["Al->Be", "n"] == 3 and tr.at["Al->Be", "mean_diff"] == pytest.approx(2.0)
    half = T_975_DF2 / math.sqrt(3)
    assert tr.at["Al->Be", "ci_low"] == pytest.approx(2 - half, abs=1e-4)
    assert tr.at["Al->Be", "ci_high"] == pytest.approx(2 + half, abs=1e-4)
    # Be->Al: d = (-1.5, 4, 5): mean 2.5, sd = sqrt((16 + 2.25 + 6.25) / 2) = 3.5
    half = T_975_DF2 * 3.5 / math.sqrt(3)
    assert tr.at["Be->Al", "ci_low"] == pytest.approx(2.5 - half, abs=1e-4)
    assert tr.at["Be->Al", "ci_high"] == pytest.approx(2.5 + half, abs=1e-4)
    # all 6 pairs: |d| ranks 1..6, the one negative (-1.5) has rank 2: W = 2; sign patterns
    # with a negative-rank sum <= 2: {}, {1}, {2} -> exact p = 2 * 3 / 64
    assert tr.at["all", "n"] == 6 and tr.at["all", "W"] == 2 and tr.at["all", "n_zero"] == 0
    assert tr.at["all", "p_value"] == pytest.approx(0.09375)
    assert tr.at["all", "p_method"] == "exact"
    assert tr.at["all", "mean_diff"] == pytest.approx(2.25)
    assert math.isnan(tr.at["all", "ci_low"])
    # task means: the tasks' mean differences 2 and 2.5 are the units: mean 2.25, t interval
    # with 1 degree of freedom, exact Wilcoxon p of two positive values = 2 / 4
    half = 12.706204736174707 * 0.5 / math.sqrt(2) / math.sqrt(2)
    row = tr.loc["task means"]
    assert row["n"] == 2 and row["mean_diff"] == pytest.approx(2.25)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((2.25 - half, 2.25 + half), abs=1e-4)
    assert row["W"] == 0 and row["p_value"] == pytest.approx(0.5)
    # the count footer counts tasks, so it carries the test over task means
    t = table(sweep / "transfer_table.csv")
    assert t.at["BIN >= BN", "dann BIN - BN"] == "2/2 (p=0.50, n=2)"
    md = (sweep / "comparison.md").read_text()
    assert "Student's t" in md and "p=0.094 (exact), W=2" in md and "p=0.50 (exact), W=0" in md
    assert "[-0.48, +4.48]" in md  # 2 -+ 2.4841
    assert "[-0.93, +5.43]" in md  # 2.25 -+ 3.1766


def test_comparison_follows_the_selected_rule(sweep: Path) -> None:
    # entropy picks iter 20: bin - bn = d - 8 = (-7, -6, -5, -9.5, -4, -3), all negative,
    # |d| distinct: W = 0, exact p = 2 / 64
    write_tables(sweep, select="entropy")
    c = pd.read_csv(sweep / "comparison_select-entropy.csv")
    row = c[(c.setting == "transfer") & (c.task == "all")].iloc[0]
    assert row["W"] == 0 and row["p_value"] == pytest.approx(2 / 64)
    assert row["mean_diff"] == pytest.approx(2.25 - 8)
    t = table(sweep / "transfer_table_select-entropy.csv")
    assert t.at["BIN >= BN", "dann BIN - BN"] == "0/2 (p=0.50, n=2)"  # task means -6, -5.5


def test_select_cli_and_bad_input(tmp_path: Path, run_cli) -> None:
    sweep = make_sweep(tmp_path / "s", holdout=False)  # --source-val-fraction 0: no val_source
    code, out, err = run_cli("tables", sweep, "--select", "snd")
    assert code == 0, err
    assert str(sweep / "transfer_table_select-snd.md") in out.split()
    for rule, col in (("source", "val_source"), ("dev", "val_dev")):
        code, _, err = run_cli("tables", sweep, "--select", rule, "--out", tmp_path / rule)
        assert code != 0 and err.count("\n") == 1 and "Traceback" not in err
        assert f"--select {rule} needs {col}, which these runs did not record" in err
        assert "--source-val-fraction > 0" in err
        assert not (tmp_path / rule).exists()  # nothing written
    code, _, err = run_cli("tables", sweep, "--select", "no-such-rule")
    assert code != 0 and err.count("\n") == 1
    assert "unknown --select rule 'no-such-rule'; choose from last, source, entropy, snd, dev, oracle" in err
    # the selection table leaves out what was not recorded
    sel = pd.read_csv(sweep / "selection_table.csv")
    assert set(sel.rule) == {"last", "entropy", "snd", ORACLE}
    assert "left out: transfer: source, dev; multidomain: source, dev" in (
        sweep / "selection_table.md").read_text()


def test_a_rule_one_setting_did_not_record_leaves_out_only_that_setting(tmp_path: Path,
                                                                         run_cli) -> None:
    # as the engine writes them: multi-domain runs have no source hold-out, transfer runs do
    sweep = make_sweep(tmp_path / "s", md_holdout=False)
    code, _, err = run_cli("tables", sweep, "--select", "dev")
    assert code == 0, err
    t = table(sweep / "transfer_table_select-dev.csv")
    assert t.at["Al->Be", "dann/bn"] == mean_std([base("Al->Be", s) + 5.0 for s in range(3)])
    assert not (sweep / "multidomain_table_select-dev.csv").exists()
    assert "Multi-domain runs did not record val_dev" in (
        sweep / "comparison_select-dev.md").read_text()
    sel = pd.read_csv(sweep / "selection_table.csv")
    assert {"source", "dev"} <= set(sel[sel.setting == "transfer"].rule)
    assert set(sel[sel.setting == "multidomain"].rule) == {"last", "entropy", "snd", ORACLE}
    assert "left out: multidomain: source, dev." in (sweep / "selection_table.md").read_text()


def test_runs_without_log_or_with_an_old_log(tmp_path: Path, run_cli) -> None:
    sweep = make_sweep(tmp_path / "a", no_log=True)
    write_tables(sweep)  # last: metrics.json suffices
    assert table(sweep / "transfer_table.csv").at["Be->Al", "dann/bin"] == mean_std(
        [base("Be->Al", s) + D["Be->Al", s] for s in range(3)])
    assert "1 finished run(s) without log.csv" in (sweep / "selection_table.md").read_text()
    code, _, err = run_cli("tables", sweep, "--select", "oracle")
    assert code != 0 and err.count("\n") == 1
    assert "--select oracle needs each run's log.csv, which 1 of 14 finished runs lack" in err

    old = make_sweep(tmp_path / "b", old_log=True)  # a missing column counts as empty
    code, _, err = run_cli("tables", old, "--select", "entropy")
    assert code != 0 and "needs val_entropy, which 1 of 14 runs did not record" in err
    assert run_cli("tables", old, "--select", "oracle")[0] == 0


def test_stability_table_seed_std_and_late_swing(sweep: Path) -> None:
    """stability.csv: seed std of the last accuracy; swing = range over evaluations at
    iter >= iters / 2 (here iters 20 and 30): bn |last + 5 - last| = 5, bin 3 by construction."""
    write_tables(sweep)
    st = pd.read_csv(sweep / "stability.csv").set_index(["setting", "row", "norm"])
    for task in TASKS:
        for norm, swing in (("bn", 5.0), ("bin", 3.0)):
            lasts = [base(task, s) + (D[(task, s)] if norm == "bin" else 0.0) for s in range(3)]
            row = st.loc[("transfer", task, norm)]
            assert row["n_seeds"] == 3 and row["method"] == "dann"
            assert row["last_mean"] == pytest.approx(sum(lasts) / 3, abs=1e-3)
            assert row["seed_std"] == pytest.approx(pd.Series(lasts).std(ddof=1), abs=1e-3)
            assert row["swing_mean"] == pytest.approx(swing, abs=1e-3)
            assert row["swing_max"] == pytest.approx(swing, abs=1e-3)
    # multi-domain: target_acc = the domains' mean; iter 20 vs 30: bn 80 vs 70, bin 85 vs 80
    assert st.loc[("multidomain", "multidomain", "bn"), "swing_mean"] == pytest.approx(10.0)
    assert st.loc[("multidomain", "multidomain", "bin"), "swing_mean"] == pytest.approx(5.0)
    assert math.isnan(st.loc[("multidomain", "multidomain", "bn"), "seed_std"])  # one seed
    assert "swing" in (sweep / "stability.md").read_text()


def test_trajectory_means_per_iteration(sweep: Path) -> None:
    """trajectory.csv: per method/norm and iteration the mean over the 6 transfer runs of
    the target accuracy (by construction, bn: last - 10, last + 5, last at iters 10, 20, 30
    with mean last 57; bin: last - 10, last - 3, last with mean last 57 + 2.25) and of the
    logged diagnostics (mean_gate written here into the bin logs as 1 - iter / 100)."""
    for run in (sweep / "runs").glob("*_bin_*"):
        rd = RunDir(run)
        log = rd.read_log()
        rd.write_log(log.assign(mean_gate=1 - log["iter"] / 100).to_dict("records"))
    write_tables(sweep)
    tr = pd.read_csv(sweep / "trajectory.csv")
    tr = tr[tr.setting == "transfer"].set_index(["norm", "iter"])
    assert set(tr["n_runs"]) == {6}
    for it, bn, bin_ in [(10, 47.0, 49.25), (20, 62.0, 56.25), (30, 57.0, 59.25)]:
        assert tr.at[("bn", it), "target_acc"] == pytest.approx(bn)
        assert tr.at[("bin", it), "target_acc"] == pytest.approx(bin_)
        assert tr.at[("bin", it), "mean_gate"] == pytest.approx(1 - it / 100)
        assert math.isnan(tr.at[("bn", it), "mean_gate"])
    md = (sweep / "trajectory.md").read_text()
    assert "mean_gate" in md and "settle" in md


def make_lr_sweep(root: Path) -> Path:
    """B for `versus`: the grid of `make_sweep` at another lr, bin runs only, accuracies up by
    2 + 0.1 seed points (+0.5 on Be->Al, whose seed 2 is missing)."""
    dirs = []
    for (task, seed), d in D.items():
        if (task, seed) == ("Be->Al", 2):
            continue
        last = base(task, seed) + d + 2.0 + 0.1 * seed + (0.5 if task == "Be->Al" else 0.0)
        cfg = make_config(dataset="toy", setting="transfer", source=TASKS[task][0],
                          target=TASKS[task][1], method="dann", norm="bin", seed=seed,
                          iters=30, lr=0.5)
        dirs.append(write_run(root, cfg, {"target_acc": last / 100}, transfer_log(last, "bin")))
    atomic_write_json(root / "sweep.json", {
        "command": "domadapt sweep --dataset toy --lr 0.5",
        "layout": Layout(**{**LAYOUT.__dict__, "norms": ("bin",), "multidomain": False}).to_dict(),
        "runs": [str(d.relative_to(root)) for d in dirs]})
    return root


def test_versus_pairs_two_sweeps_and_names_what_differs(tmp_path: Path, run_cli) -> None:
    """B = `make_lr_sweep`: five distinct positive differences, and `lr` heads the table as
    what differs."""
    a = make_sweep(tmp_path / "a")
    make_lr_sweep(tmp_path / "b")
    code, stdout, err = run_cli("versus", a, tmp_path / "b", "--out", tmp_path / "v")
    assert code == 0, err
    assert stdout.split() == [str(tmp_path / "v" / "versus.csv"), str(tmp_path / "v" / "versus.md")]
    v = pd.read_csv(tmp_path / "v" / "versus.csv")
    assert set(zip(v.setting, v.method, v.norm)) == {("transfer", "dann", "bin")}
    rows = v.set_index("row")
    assert rows.at["Al->Be", "n"] == 3 and rows.at["Be->Al", "n"] == 2 and rows.at["all", "n"] == 5
    assert rows.at["Al->Be", "mean_diff"] == pytest.approx(2.1)
    assert rows.at["Be->Al", "mean_diff"] == pytest.approx(2.55)
    assert rows.at["all", "mean_diff"] == pytest.approx((2.0 + 2.1 + 2.2 + 2.5 + 2.6) / 5)
    assert rows.at["all", "mean_b"] - rows.at["all", "mean_a"] == pytest.approx(
        rows.at["all", "mean_diff"], abs=1e-3)  # the `all` means are over the same pairs
    assert rows.at["Al->Be", "mean_a"] == pytest.approx(sum(base("Al->Be", s) + D[("Al->Be", s)]
                                                            for s in range(3)) / 3)
    assert rows.at["all", "p_value"] == pytest.approx(2 / 2**5)  # all 5 differences > 0, exact
    # task means: Al->Be 2.1, Be->Al 2.55 count once each; the means of A and B likewise
    tm = rows.loc["task means"]
    assert tm["n"] == 2 and tm["mean_diff"] == pytest.approx((2.1 + 2.55) / 2)
    assert tm["mean_b"] - tm["mean_a"] == pytest.approx(tm["mean_diff"], abs=1e-3)
    assert tm["mean_a"] == pytest.approx((rows.at["Al->Be", "mean_a"]
                                          + rows.at["Be->Al", "mean_a"]) / 2, abs=1e-3)
    assert tm["ci_low"] < tm["mean_diff"] < tm["ci_high"] and tm["p_value"] == pytest.approx(0.5)
    md = (tmp_path / "v" / "versus.md").read_text()
    assert "lr: 0.01 (A) vs 0.5 (B)" in md and "+2.10" in md
    assert "Provenance: 0 of 5 A/B pairs pair runs that differ in CPU kernel set" in md
    code, _, err = run_cli("versus", a, tmp_path / "nowhere")
    assert code != 0 and err.count("\n") == 1 and "nowhere" in err


def test_versus_gates_pool_only_paired_runs(tmp_path: Path, run_cli) -> None:
    """With gates.csv in the bin runs of both sweeps, versus pools each side's gates over the
    runs that have a partner: A's gates are 1 in layer l0, B's 0, layer l1 is the same on both
    sides; A's unpaired run (Be->Al seed 2) has all gates at 0.5 and must not count. Totals by
    hand over 8 channels: A mean (4 + 2.5) / 8, B 2.5 / 8; shares below 0.1 1/8 vs 5/8, above
    0.9 6/8 vs 2/8."""
    import numpy as np

    from domadapt.norms.gates import RECORD, summarize_gates

    a, b = make_sweep(tmp_path / "a"), make_lr_sweep(tmp_path / "b")
    l1 = np.array([0.05, 0.5, 0.95, 1.0])
    for sweep, l0 in ((a, 1.0), (b, 0.0)):
        for run in (sweep / "runs").glob("*_bin_*"):
            gates = {"l0": np.full(4, l0), "l1": l1}
            if sweep == a and run.name.startswith("Beta-Alpha_dann_bin_s2-"):
                gates = {"l0": np.full(4, 0.5), "l1": np.full(4, 0.5)}
            summarize_gates(gates).to_csv(run / RECORD, index=False)
    code, stdout, err = run_cli("versus", a, b, "--out", tmp_path / "v")
    assert code == 0, err
    assert stdout.split()[2:] == [str(tmp_path / "v" / "versus_gates.csv"),
                                  str(tmp_path / "v" / "versus_gates.png")]
    layers = pd.read_csv(tmp_path / "v" / "versus_gates.csv").set_index(["sweep", "layer"])
    assert set(layers["norm"]) == {"bin"} and set(layers["n_runs"]) == {5}
    assert layers.at[("A", "l0"), "mean"] == 1.0 and layers.at[("B", "l0"), "mean"] == 0.0
    assert layers.at[("A", "l0"), "min"] == 1.0  # the unpaired run's 0.5 is left out
    assert layers.at[("A", "l1"), "mean"] == pytest.approx(0.625)
    assert layers.at[("B", "l0"), "hist_0.0_0.1"] == 20 and layers.at[("A", "l0"), "hist_0.9_1.0"] == 20
    md = (tmp_path / "v" / "versus.md").read_text()
    gates = md[md.index("## BIN gates"):]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:7]]
            for line in gates.splitlines() if line.startswith(("| A ", "| B "))}
    assert rows == {"A": ["5", "0.812", "12.50", "75.00"], "B": ["5", "0.312", "62.50", "25.00"]}
    # a later versus without gates on one side removes the stale gate files
    for run in (b / "runs").glob("*"):
        (run / RECORD).unlink()
    code, stdout, err = run_cli("versus", a, b, "--out", tmp_path / "v")
    assert code == 0, err
    assert not (tmp_path / "v" / "versus_gates.csv").exists()
    assert not (tmp_path / "v" / "versus_gates.png").exists()
    assert "## BIN gates" not in (tmp_path / "v" / "versus.md").read_text()


def test_versus_gates_need_records_on_both_sides(tmp_path: Path, run_cli) -> None:
    """A cell counts only when both its runs wrote gates.csv: A has gates in every bin run
    (all 1), B only in Al->Be seeds 0 and 1 (all 0), so each side pools those 2 runs."""
    import numpy as np

    from domadapt.norms.gates import RECORD, summarize_gates

    a, b = make_sweep(tmp_path / "a"), make_lr_sweep(tmp_path / "b")
    for run in (a / "runs").glob("*_bin_*"):
        summarize_gates({"l0": np.ones(4)}).to_csv(run / RECORD, index=False)
    for seed in (0, 1):
        run = next((b / "runs").glob(f"Alpha-Beta_dann_bin_s{seed}-*"))
        summarize_gates({"l0": np.zeros(4)}).to_csv(run / RECORD, index=False)
    code, _, err = run_cli("versus", a, b, "--out", tmp_path / "v")
    assert code == 0, err
    layers = pd.read_csv(tmp_path / "v" / "versus_gates.csv").set_index("sweep")
    assert layers.at["A", "n_runs"] == 2 and layers.at["B", "n_runs"] == 2
    assert layers.at["A", "mean"] == 1.0 and layers.at["B", "mean"] == 0.0
