"""A pre-registered analysis of one norm against another (`domadapt evidence`): one primary
comparison and a family of secondary ones, each over the tasks as units, the secondary p-values
Holm-corrected together.

For a sweep with a `baseline` and a `treatment` norm under one method (default: BN and BIN
under DANN), transfer runs only. Every comparison is `a - b` in percentage points, paired by
task and seed; each task's difference is the mean over its seeds, and the 12 (or however many
finished) task means are the units: a 95 % Student-t interval and the exact two-sided Wilcoxon
signed-rank p over them (`stats.paired_comparison`, unit "tasks").

    primary     treatment - baseline at the last evaluation (metrics.json's target_acc)
    trajectory  the same at every earlier evaluation (log.csv)
    adabn       treatment - baseline with AdaBN; treatment + AdaBN - baseline + AdaBN
                (`target_acc_adabn`, runs trained with --adabn)
    selection   treatment - baseline with the evaluation chosen by each rule that needs no
                target label (source, dev, entropy, snd); `oracle` is reported, labelled,
                and not tested
    knockout    BIN - BIN gates=1, BIN - BIN gates=1 restat, BIN gates=1 restat - BN
                (`gate_knockout.json` records, `analysis.knockout`)
    robustness  the primary comparison with each domain left out of the task set

Descriptive sections, never tested: the plateau check (each arm's accuracy at the last two
evaluations, `plateau_frame`) and the treatment's gates at the end beside another sweep's
(`gate_summary`: mean, first and last layer, shares below 0.1 and above 0.9).

Decision rules (stated before the results in results/pacs-long/README.md): the primary
difference is a finding when its t interval excludes 0 *and* Wilcoxon p < 0.05 (in the same
direction); a secondary one when its Holm-adjusted p < 0.05. Anything else is "not shown",
with its interval. Comparisons whose records are missing are listed as such, not dropped
silently. While fewer runs have finished than sweep.json plans, every verdict is marked
`interim (...)`: the rules are for the complete grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from domadapt.errors import UserError
from domadapt.io import read_json

PRIMARY, SECONDARY, ORACLE = "primary", "secondary", "oracle (not tested)"
# Pre-registered (results/pacs-long/README.md), so fixed here rather than read from the
# validator registry: a validator added later does not join this Holm family.
LABEL_FREE_RULES = ("source", "dev", "entropy", "snd")
COLUMNS = ("family", "group", "comparison", "iteration", "n_tasks", "n_pairs", "mean_diff", "ci_low",
           "ci_high", "p_value", "p_holm", "verdict")


def _task_rows(runs: list[Any], method: str, norms: tuple[str, str]) -> list[Any]:
    return [r for r in runs if r.config["setting"] == "transfer"
            and r.config["method"] == method and r.config["norm"] in norms]


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["task", "seed", "variant", "accuracy"])


def _compare(frame: pd.DataFrame, a: str, b: str) -> dict[str, Any]:
    """n_tasks, n_pairs, mean_diff, ci_low, ci_high, p_value of a - b over task means."""
    from domadapt.stats import paired_comparison

    empty = {"n_tasks": 0, "n_pairs": 0, "mean_diff": math.nan, "ci_low": math.nan,
             "ci_high": math.nan, "p_value": math.nan}
    if frame.empty or not {a, b} <= set(frame["variant"]):
        return empty
    frame = frame.assign(accuracy=frame["accuracy"].round(9))
    _, overall = paired_comparison(frame, "variant", a, b)
    if overall.empty:
        return empty
    by_unit = overall.set_index("unit")
    tasks = by_unit.loc["tasks"]
    return {"n_tasks": int(tasks["n"]), "n_pairs": int(by_unit.loc["pairs", "n"]),
            "mean_diff": float(tasks["mean_diff"]), "ci_low": float(tasks["ci_low"]),
            "ci_high": float(tasks["ci_high"]), "p_value": float(tasks["p_value"])}


def evidence_frame(sweep_dir: Path, *, method: str = "dann", baseline: str = "bn",
                   treatment: str = "bin") -> pd.DataFrame:
    """COLUMNS, one row per comparison (module docstring), primary first."""
    from domadapt.analysis.knockout import RECORD as KNOCKOUT
    from domadapt.tables import load_sweep, selected_scores

    layout, all_runs, _ = load_sweep(sweep_dir)
    runs = _task_rows(all_runs, method, (baseline, treatment))
    for norm in (baseline, treatment):
        if not any(r.config["norm"] == norm for r in runs):
            raise UserError(f"{sweep_dir}: no finished {method} transfer run with --norm {norm}")
    tb, bb = treatment.upper(), baseline.upper()
    task = {id(r): layout.task_label(r.config["source"], r.config["target"]) for r in runs}
    domains_of = {id(r): (r.config["source"], r.config["target"]) for r in runs}

    def last(column: str = "target_acc", label: Callable[[Any], str] = lambda r: r.config[
            "norm"]) -> pd.DataFrame:
        return _frame([{"task": task[id(r)], "seed": r.config["seed"], "variant": label(r),
                        "accuracy": 100.0 * r.metrics[column]}
                       for r in runs if r.metrics.get(column) is not None])

    def logged(column: str, iteration: int, suffix: str = "") -> pd.DataFrame:
        rows = []
        for r in runs:
            if r.log is None or column not in r.log:
                continue
            hit = r.log.loc[r.log["iter"] == iteration, column].dropna()
            if len(hit):
                rows.append({"task": task[id(r)], "seed": r.config["seed"],
                             "variant": r.config["norm"] + suffix,
                             "accuracy": 100.0 * float(hit.iloc[-1])})
        return _frame(rows)

    specs: list[tuple[str, str, str, pd.DataFrame, str, str]] = []
    primary = last()
    specs.append((PRIMARY, "primary", f"{tb} - {bb}, last evaluation", primary, treatment,
                  baseline))
    iters = sorted({int(i) for r in runs if r.log is not None for i in r.log["iter"]})
    final = max((int(r.config["iters"]) for r in runs), default=0)
    at = {f"{tb} - {bb}, last evaluation": final}
    for i in (i for i in iters if i < final):
        at[f"{tb} - {bb}, iteration {i}"] = i
        specs.append((SECONDARY, "trajectory", f"{tb} - {bb}, iteration {i}",
                      logged("target_acc", i), treatment, baseline))
    adabn = pd.concat([primary, last("target_acc_adabn", lambda r: r.config["norm"] + "+adabn")],
                      ignore_index=True)
    specs += [(SECONDARY, "adabn", f"{tb} - {bb}+AdaBN", adabn, treatment, baseline + "+adabn"),
              (SECONDARY, "adabn", f"{tb}+AdaBN - {bb}+AdaBN", adabn, treatment + "+adabn",
               baseline + "+adabn")]
    for rule in (*LABEL_FREE_RULES, "oracle"):
        try:
            scores, _ = selected_scores(runs, layout, rule)
        except UserError:  # the runs did not log that validator
            scores = pd.DataFrame(columns=["row", "seed", "norm", "acc"])
        frame = _frame([{"task": s["row"], "seed": s["seed"], "variant": s["norm"],
                         "accuracy": s["acc"]} for s in scores.to_dict("records")])
        specs.append((ORACLE if rule == "oracle" else SECONDARY, "selection",
                      f"{tb} - {bb}, selected by {rule}"
                      + (" (target labels)" if rule == "oracle" else ""), frame, treatment,
                      baseline))
    knock = []
    for r in runs:
        path = r.run_dir / KNOCKOUT
        if r.config["norm"] == baseline:
            knock.append({"task": task[id(r)], "seed": r.config["seed"], "variant": bb,
                          "accuracy": 100.0 * r.metrics["target_acc"]})
        elif path.is_file():
            record = read_json(path)
            for key, variant in (("trained", tb), ("gates_one", f"{tb} gates=1"),
                                 ("gates_one_restat", f"{tb} gates=1 restat")):
                if key in record:
                    accs = list(record[key].values())
                    knock.append({"task": task[id(r)], "seed": r.config["seed"],
                                  "variant": variant, "accuracy": 100.0 * sum(accs) / len(accs)})
    knock_frame = _frame(knock)
    for a, b in ((tb, f"{tb} gates=1"), (tb, f"{tb} gates=1 restat"),
                 (f"{tb} gates=1 restat", bb)):
        specs.append((SECONDARY, "knockout", f"{a} - {b}", knock_frame, a, b))
    for domain in layout.domains:
        keep = {task[id(r)] for r in runs if domain not in domains_of[id(r)]}
        specs.append((SECONDARY, "robustness",
                      f"{tb} - {bb}, last evaluation, without {layout.short_names[domain]}",
                      primary[primary["task"].isin(keep)], treatment, baseline))

    rows = [{"family": fam, "group": group, "comparison": name,
             "iteration": at.get(name) if group in ("primary", "trajectory") else None,
             **_compare(frame, a, b)} for fam, group, name, frame, a, b in specs]
    out = pd.DataFrame(rows).astype({"iteration": "Int64"})
    secondary = out["family"] == SECONDARY
    out["p_holm"] = math.nan
    if secondary.any():
        from domadapt.stats import holm

        out.loc[secondary, "p_holm"] = holm(out.loc[secondary, "p_value"].tolist())
    out["verdict"] = [_verdict(r) for r in out.to_dict("records")]
    return out[list(COLUMNS)]


def _verdict(row: dict[str, Any]) -> str:
    """The pre-registered decision rule (module docstring)."""
    if row["n_tasks"] == 0:
        return "no records"
    if row["family"] == ORACLE:
        return "not tested (oracle)"
    p = row["p_value"] if row["family"] == PRIMARY else row["p_holm"]
    if row["family"] == PRIMARY:
        lo, hi = row["ci_low"], row["ci_high"]
        if p < 0.05 and lo > 0:
            return "finding: a > b"
        if p < 0.05 and hi < 0:
            return "finding: a < b"
        return "not shown"
    if p < 0.05:
        return "supported: a > b" if row["mean_diff"] > 0 else "supported: a < b"
    return "not shown"


NOTE = (
    "Pre-registered analysis (`domadapt.analysis.evidence`): differences `a - b` in percentage "
    "points, paired by task and seed; each task's difference is its seeds' mean and the tasks "
    "are the units (n_tasks): mean, 95 % Student-t interval and exact two-sided Wilcoxon "
    "signed-rank p over the task means (n_pairs: the (task, seed) pairs behind them). Primary: "
    "a finding when the interval excludes 0 and p < 0.05. Secondary: p-values Holm-corrected "
    "as one family (p_holm); supported when p_holm < 0.05; intervals unadjusted. `not shown` "
    "is no evidence either way: the interval says which effects the runs rule out. The oracle "
    "row picks each run's evaluation with target labels: reported, never tested, never the "
    "headline.")


def evidence_report(sweep_dir: str | Path, *, method: str = "dann", baseline: str = "bn",
                    treatment: str = "bin", gates_beside: Path | None = None) -> list[Path]:
    """evidence.csv, evidence.md and evidence.png (`plots.evidence_figure`: the trajectory of
    the difference, and the treatment's gates beside those of `gates_beside`, another sweep's
    tables folder) beside the sweep's tables. Returns the paths written."""
    from domadapt.analysis.report import find_tables
    from domadapt.plots import require_matplotlib
    from domadapt.tables import GATES_BY_LAYER, load_sweep, write_csv_atomic, write_markdown_parts

    if gates_beside is not None and not (Path(gates_beside) / GATES_BY_LAYER).is_file():
        raise UserError(f"{Path(gates_beside) / GATES_BY_LAYER}: not found (--gates-beside "
                        "needs a sweep's tables folder)")
    require_matplotlib()
    sweep_dir = Path(sweep_dir)
    frame = evidence_frame(sweep_dir, method=method, baseline=baseline, treatment=treatment)
    _, all_runs, record = load_sweep(sweep_dir)
    planned = len(record.get("runs", []))
    note = NOTE
    if len(all_runs) < planned:  # the decision rules are for the complete grid
        frame["verdict"] = [f"interim ({v})" for v in frame["verdict"]]
        note = (f"**Interim: {len(all_runs)} of the {planned} runs this sweep plans have "
                "finished. The pre-registered decision rules apply to the complete grid; a "
                "verdict marked interim is not a result.**\n\n" + NOTE)
    out_dir = find_tables(sweep_dir)
    csv = write_csv_atomic(frame.round({c: 4 for c in ("mean_diff", "ci_low", "ci_high")})
                           .round({"p_value": 6, "p_holm": 6}), out_dir / "evidence.csv",
                           index=False)
    shown = pd.DataFrame({
        "comparison": frame["comparison"], "tasks": frame["n_tasks"],
        "pairs": frame["n_pairs"],
        "diff": [_fmt(v, signed=True) for v in frame["mean_diff"]],
        "95% CI (t)": [f"[{_fmt(lo, signed=True)}, {_fmt(hi, signed=True)}]"
                       if not math.isnan(lo) else "" for lo, hi in
                       zip(frame["ci_low"], frame["ci_high"], strict=True)],
        "p (Wilcoxon)": [_fmt_p(p) for p in frame["p_value"]],
        "p (Holm)": [_fmt_p(p) for p in frame["p_holm"]],
        "verdict": frame["verdict"],
    })
    sections = [(title, shown[frame["family"] == fam].set_index("comparison"))
                for fam, title in ((PRIMARY, "Primary comparison"),
                                   (SECONDARY, "Secondary comparisons (one Holm family)"),
                                   (ORACLE, "Oracle (target labels; not tested)"))
                if (frame["family"] == fam).any()]
    plateau = plateau_frame(all_runs, method=method, norms=(baseline, treatment))
    if len(plateau):
        title = ("Plateau check (descriptive, not tested): target accuracy (%) at the last two "
                 "evaluations")
        sections.append((title, plateau.round(2).set_index("norm")))
    gates = _gates((out_dir, gates_beside), method, treatment)
    if gates:
        sections.append(("Gates at the last iteration (descriptive, not tested)",
                         gate_summary(gates).round(3).set_index("gates of")))
    md = write_markdown_parts(out_dir / "evidence.md",
                              f"{treatment.upper()} against {baseline.upper()} under {method}",
                              note, sections, f"domadapt evidence {sweep_dir}"
                              + (f" --gates-beside {gates_beside}" if gates_beside else ""))
    return [csv, md, _figure(frame, out_dir, method, treatment, baseline, gates)]


def _gates(folders: tuple[Path | None, ...], method: str, treatment: str) -> list[pd.DataFrame]:
    """The treatment's transfer rows of each folder's gates_by_layer.csv, with a `group` label
    naming the folder and its number of runs; folders without such rows are skipped."""
    from domadapt.tables import GATES_BY_LAYER

    gates = []
    for folder in folders:
        if folder is None or not (Path(folder) / GATES_BY_LAYER).is_file():
            continue  # a sweep without BIN gate records
        g = pd.read_csv(Path(folder) / GATES_BY_LAYER)
        g = g[(g["setting"] == "transfer") & (g["method"] == method)
              & (g["norm"] == treatment)]
        if len(g):
            runs = int(g["n_runs"].max())
            gates.append(g.assign(group=f"{Path(folder).name}: {method} {treatment} "
                                        f"({runs} run{'s' if runs != 1 else ''})"))
    return gates


def gate_summary(gates: list[pd.DataFrame]) -> pd.DataFrame:
    """Per gate source (`_gates`), descriptive: the number of gate values (channels x runs),
    their mean, the mean of the first and of the last gated layer, and the shares below 0.1
    and above 0.9, all from the per-layer histograms of gates_by_layer.csv."""
    rows = []
    for g in gates:
        g = g.sort_values("depth")
        bins = [c for c in g.columns if c.startswith("hist_")]
        counts = g[bins].to_numpy(dtype=float)
        n = counts.sum(axis=1)
        rows.append({"gates of": g["group"].iloc[0], "layers": len(g), "values": int(n.sum()),
                     "mean": float((g["mean"] * n).sum() / n.sum()),
                     "first layer": float(g["mean"].iloc[0]),
                     "last layer": float(g["mean"].iloc[-1]),
                     "share < 0.1": float(counts[:, 0].sum() / n.sum()),
                     "share > 0.9": float(counts[:, -1].sum() / n.sum())})
    return pd.DataFrame(rows, columns=["gates of", "layers", "values", "mean", "first layer",
                                       "last layer", "share < 0.1", "share > 0.9"])


def plateau_frame(all_runs: list[Any], *, method: str, norms: tuple[str, str]) -> pd.DataFrame:
    """The plateau check, per norm: over the finished runs (`tables.load_sweep`) that logged
    both of the last two evaluations, the mean target accuracy (%) at each, the mean change
    and the mean absolute change between them (how far single runs still move)."""
    rows = []
    for norm in norms:
        pairs = []
        for r in _task_rows(all_runs, method, (norm,)):
            log = None if r.log is None else r.log.dropna(subset=["target_acc"])
            if log is not None and len(log) >= 2:
                pairs.append((int(log["iter"].iloc[-2]), int(log["iter"].iloc[-1]),
                              100.0 * log["target_acc"].iloc[-2],
                              100.0 * log["target_acc"].iloc[-1]))
        if not pairs:
            continue
        first, last = {p[0] for p in pairs}, {p[1] for p in pairs}
        change = [b - a for *_, a, b in pairs]
        rows.append({"norm": norm.upper(), "runs": len(pairs),
                     "iterations": f"{'/'.join(map(str, sorted(first)))} -> "
                                   f"{'/'.join(map(str, sorted(last)))}",
                     "before": sum(p[2] for p in pairs) / len(pairs),
                     "last": sum(p[3] for p in pairs) / len(pairs),
                     "mean change": sum(change) / len(change),
                     "mean abs change": sum(abs(c) for c in change) / len(change)})
    return pd.DataFrame(rows, columns=["norm", "runs", "iterations", "before", "last",
                                       "mean change", "mean abs change"])


def _figure(frame: pd.DataFrame, out_dir: Path, method: str, treatment: str, baseline: str,
            gates: list[pd.DataFrame]) -> Path:
    """evidence.png: the primary and trajectory rows, and the treatment's gates (`_gates`)."""
    from domadapt.plots import evidence_figure, save_png

    trajectory = frame[frame["group"].isin(["primary", "trajectory"])].sort_values("iteration")
    path = out_dir / "evidence.png"
    save_png(evidence_figure(trajectory, pd.concat(gates) if gates else pd.DataFrame(
        columns=["group", "depth", "mean"]), f"{treatment.upper()} - {baseline.upper()} under "
        f"{method}: trajectory and gates"), path)
    return path


def _fmt(value: float, *, signed: bool = False) -> str:
    if math.isnan(value):
        return ""
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return ""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
