"""Frames: pandas tables built from finished runs (runs, scores, gates, evaluations, stability,
trajectory, selection), accuracies in percent."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from domadapt.errors import UserError
from domadapt.norms import NORMS
from domadapt.norms.gates import HIGH, HIST_COLUMNS, LOW, gate_totals
from domadapt.norms.gates import RECORD as GATES_RECORD
from domadapt.selection import get_rule, select_runs, selection_table
from domadapt.tables.records import FinishedRun, Layout, relative_path, run_task

RUN_COLUMNS = (
    "dataset", "setting", "task", "source", "target", "method", "norm", "backbone", "seed",
    "iters", "target_acc", "avg_acc", "wall_seconds", "code", "cpu", "cpu_capability", "host",
    "run_key", "run_dir",
)  # + every norm's diagnostics (e.g. mean_gate) found in the runs, before wall_seconds
ACC_COLUMNS = ("target_acc", "avg_acc")  # fractions in metrics.json, percent in tables
SELECTION_COLUMNS = ("rule", "uses_target_labels", "setting", "method", "norm", "target_acc",
                     "regret", "runs")

def runs_frame(runs: list[FinishedRun], layout: Layout, sweep_dir: Path) -> pd.DataFrame:
    """One row per finished run (RUN_COLUMNS + diagnostics), accuracies in percent."""
    found = {k for run in runs for k in run.metrics}
    diagnostics = [k for _, kind in NORMS.items() for k in kind.diagnostic_names() if k in found]
    at = RUN_COLUMNS.index("wall_seconds")
    columns = [*RUN_COLUMNS[:at], *dict.fromkeys(diagnostics), *RUN_COLUMNS[at:]]
    rows = []
    for run in runs:
        cfg = run.config
        row = {k: cfg[k] for k in ("dataset", "setting", "method", "norm", "backbone", "seed",
                                   "iters")}
        row.update(
            task=run_task(run, layout),
            source=cfg["source"] if cfg["setting"] == "transfer" else None,
            target=cfg["target"] if cfg["setting"] != "multidomain" else None,
            run_key=run.key,
            run_dir=relative_path(run.run_dir, sweep_dir),
            **run.provenance,
        )
        row.update({k: run.metrics.get(k) for k in columns if k not in row})
        for k in ACC_COLUMNS:
            row[k] = None if row[k] is None else 100.0 * row[k]
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def scores_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """Long table of accuracies in percent: setting, row, method, norm, seed, acc.

    A transfer run gives one row (its task, target accuracy), a dg run one (its held-out
    domain, that domain's accuracy); a multi-domain run one per domain (that domain's test
    accuracy).
    """
    rows = []
    for run in runs:
        cfg = run.config
        base = {k: cfg[k] for k in ("setting", "method", "norm", "seed")}
        if cfg["setting"] != "multidomain":
            rows.append({**base, "row": run_task(run, layout),
                         "acc": 100.0 * run.metrics["target_acc"]})
        else:
            rows += [{**base, "row": d, "acc": 100.0 * a}
                     for d, a in run.metrics["domain_acc"].items()]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def gates_frame(runs: list[FinishedRun]) -> pd.DataFrame:
    """BIN gates per layer, pooled over the runs that wrote gates.csv (`norms.gates`): one
    row per setting, method, norm and layer (network order) with n_runs; `mean`: the mean over
    runs of the layer's mean rho; `min`: the lowest rho of any run; `frac_*`: means over runs;
    `hist_*`: channel counts summed over runs. Empty without such runs."""

    parts = [pd.read_csv(run.run_dir / GATES_RECORD).assign(
                 **{k: run.config[k] for k in ("setting", "method", "norm")})
             for run in runs if (run.run_dir / GATES_RECORD).is_file()]
    if not parts:
        return pd.DataFrame()
    fractions = [f"frac_below_{LOW}", f"frac_above_{HIGH}"]
    return (pd.concat(parts, ignore_index=True)
            .groupby(["setting", "method", "norm", "depth", "layer"], sort=True)
            .agg(n_runs=("mean", "size"), channels=("channels", "first"), mean=("mean", "mean"),
                 min=("min", "min"), **{c: (c, "mean") for c in fractions},
                 **{c: (c, "sum") for c in HIST_COLUMNS})
            .reset_index())


def gate_totals_frame(runs: list[FinishedRun]) -> pd.DataFrame:
    """Per setting, method and norm of the runs with gates.csv: n_runs and the mean over runs
    of each run's network-wide gate totals (`norms.gates.gate_totals`: mean rho and the
    shares of gates below LOW / above HIGH, every channel weighted equally). Empty without
    such runs."""

    rows = [{**{k: run.config[k] for k in ("setting", "method", "norm")},
             **gate_totals(pd.read_csv(run.run_dir / GATES_RECORD))}
            for run in runs if (run.run_dir / GATES_RECORD).is_file()]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).drop(columns=["layers", "channels"])
    values = [c for c in frame.columns if c not in ("setting", "method", "norm")]
    return (frame.groupby(["setting", "method", "norm"], sort=True)
            .agg(n_runs=("mean", "size"), **{c: (c, "mean") for c in values}).reset_index())


SCORE_COLUMNS = ["setting", "row", "method", "norm", "seed", "acc"]
RUN_ID = ["run", "setting", "task", "method", "norm", "seed"]


def evaluations_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """Every logged evaluation of the runs that have a log.csv: the log's columns (a column
    some log lacks is empty, NaN, in its rows) plus RUN_ID (run = the run dir, task = `Ar->Cl`,
    `multidomain` or, dg, the held-out domain: `run_task`)."""
    parts = []
    for run in runs:
        if run.log is None:
            continue
        cfg, log = run.config, run.log
        meta = {"run": str(run.run_dir), "setting": cfg["setting"], "task": run_task(run, layout),
                "method": cfg["method"], "norm": cfg["norm"], "seed": cfg["seed"]}
        parts += [{**meta, **row} for row in
                  log.drop(columns=[c for c in meta if c in log.columns]).to_dict("records")]
    return pd.DataFrame(parts, columns=None if parts else [*RUN_ID, "iter", "target_acc"])


def selected_scores(runs: list[FinishedRun], layout: Layout, select: str
                    ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(scores as `scores_frame` gives them, the evaluation chosen per run) under rule
    `select`. `last` reports metrics.json (no choice table). Another rule needs every run's
    log.csv and its column (else UserError); a multi-domain run's per-domain accuracies are
    the chosen row's `acc_<domain>`."""
    rule = get_rule(select)
    if rule.name == "last":
        return scores_frame(runs, layout), None
    unlogged = [run.run_dir for run in runs if run.log is None]
    if unlogged:
        raise UserError(f"--select {rule.name} needs each run's log.csv, which {len(unlogged)} "
                        f"of {len(runs)} finished runs lack (e.g. {unlogged[0]}); use --select "
                        "last")
    evals = evaluations_frame(runs, layout)
    if evals.empty:
        return scores_frame(runs, layout), evals.assign(selected_by=rule.label)
    evals = evals[~evals["setting"].isin(unrecorded_settings(evals, rule.name))]
    picked = select_runs(evals, rule.name, ["run"])
    by_dir = {str(run.run_dir): run for run in runs}
    rows = []
    for rec in picked.to_dict("records"):
        base = {k: rec[k] for k in ("setting", "method", "norm", "seed")}
        if rec["setting"] != "multidomain":
            rows.append({**base, "row": rec["task"], "acc": 100.0 * rec["target_acc"]})
            continue
        for domain in by_dir[rec["run"]].metrics["domain_acc"]:
            acc = rec.get(f"acc_{domain}", math.nan)
            if pd.isna(acc):
                raise UserError(f"{rec['run']}/log.csv: no acc_{domain} in the evaluation at "
                                f"iter {rec['iter']} that --select {rule.name} chose")
            rows.append({**base, "row": domain, "acc": 100.0 * acc})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS), picked


def unrecorded_settings(evals: pd.DataFrame, rule: str) -> set[str]:
    """Settings none of whose runs recorded the column of `rule` while another setting's runs
    did (multi-domain runs have no source hold-out, so no val_source / val_dev; dg runs read
    no target, so no val_entropy / val_snd / val_dev): that rule's
    tables leave them out. Empty when no setting recorded it (the rule's check then refuses)."""
    column = get_rule(rule).column
    if column is None or column not in evals.columns:
        return set()
    has = evals[column].notna().groupby(evals["setting"]).any()
    return set(has[~has].index) if has.any() else set()


def selection_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """SELECTION_COLUMNS: `selection.selection_table` over the runs with a log.csv, per
    setting/method/norm, accuracies and regrets in percent (rules some run did not record are
    left out)."""
    evals = evaluations_frame(runs, layout)
    if evals.empty:
        return pd.DataFrame(columns=list(SELECTION_COLUMNS))
    # per setting, so a rule one setting did not record still ranks the other's evaluations
    table = pd.concat([selection_table(part, ["run"], groups=("setting", "method", "norm"))
                       for _, part in evals.groupby("setting", sort=False)], ignore_index=True)
    table[["target_acc", "regret"]] *= 100.0
    return table[list(SELECTION_COLUMNS)].round({"target_acc": 4, "regret": 4})


def stability_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """STABILITY_COLUMNS, in percentage points, per setting, row (task; `multidomain`: the
    domains' mean; dg: the held-out domain), method and norm over the runs with a log.csv:
    `seed_std`, the sample std over seeds of the reported (last) accuracy; `swing`, per run
    the range (max - min) of the target accuracy over its evaluations from mid-training on
    (iter >= iters / 2), as its mean and maximum over seeds. A cell whose swing rivals a
    difference between columns reports when training stopped as much as what the method
    does."""
    rows = []
    for run in runs:
        if run.log is None or "target_acc" not in run.log:
            continue
        cfg = run.config
        late = run.log.loc[run.log["iter"] >= cfg["iters"] / 2, "target_acc"]
        rows.append({
            "setting": cfg["setting"], "row": run_task(run, layout),
            "method": cfg["method"], "norm": cfg["norm"], "seed": cfg["seed"],
            "acc": 100.0 * run.metrics["target_acc"],
            "swing": 100.0 * (late.max() - late.min()) if len(late) else float("nan"),
        })
    if not rows:
        return pd.DataFrame(columns=list(STABILITY_COLUMNS))
    out = (pd.DataFrame(rows).groupby(["setting", "row", "method", "norm"], sort=True)
           .agg(n_seeds=("seed", "size"), last_mean=("acc", "mean"), seed_std=("acc", "std"),
                swing_mean=("swing", "mean"), swing_max=("swing", "max"))
           .reset_index().sort_values("setting", ascending=False, kind="stable"))
    return out[list(STABILITY_COLUMNS)].round(
        {"last_mean": 4, "seed_std": 4, "swing_mean": 4, "swing_max": 4})


STABILITY_COLUMNS = ("setting", "row", "method", "norm", "n_seeds", "last_mean", "seed_std",
                     "swing_mean", "swing_max")


def trajectory_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """Per setting, method, norm and evaluated iteration, over the runs with a log.csv: n_runs,
    the mean over runs (tasks x seeds) of the target accuracy (percent; multi-domain: the
    domains' mean) and of the norm diagnostics the logs have (e.g. mean_gate). Only runs that
    logged that iteration count, so compare iterations on a full grid."""
    evals = evaluations_frame(runs, layout)
    found = [k for _, kind in NORMS.items() for k in kind.diagnostic_names()
             if k in evals.columns]
    if evals.empty:
        return pd.DataFrame(columns=[*TRAJECTORY_KEYS, "n_runs", "target_acc"])
    evals = evals.assign(target_acc=100.0 * evals["target_acc"])
    out = (evals.groupby(list(TRAJECTORY_KEYS), sort=True)
           .agg(n_runs=("run", "size"), target_acc=("target_acc", "mean"),
                **{k: (k, "mean") for k in dict.fromkeys(found)})
           .reset_index().sort_values("setting", ascending=False, kind="stable"))
    return out.round(4)


TRAJECTORY_KEYS = ("setting", "method", "norm", "iter")