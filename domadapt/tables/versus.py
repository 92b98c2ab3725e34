"""One sweep against another: runs paired by task, method, norm and seed (`domadapt versus`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from domadapt.errors import UserError
from domadapt.norms.gates import HIGH, LOW
from domadapt.norms.gates import RECORD as GATES_RECORD
from domadapt.selection import get_rule
from domadapt.stats import paired_comparison
from domadapt.tables.comparisons import OVERALL_ROWS, provenance_note
from domadapt.tables.frames import gate_totals_frame, gates_frame, selected_scores
from domadapt.tables.records import FinishedRun, Layout, load_sweep, run_task
from domadapt.tables.render import (
    interval,
    signed,
    wilcoxon_text,
    write_csv_atomic,
    write_markdown_parts,
)
from domadapt.tables.trials import chosen_runs

VERSUS_KEYS = ("setting", "row", "method", "norm")
IGNORED_IN_DIFF = frozenset({"seed", "source", "target", "root", "num_workers", "eval_every",
                             "checkpoint_every", "channels_last"})


def config_difference(a: list[FinishedRun], b: list[FinishedRun]) -> dict[str, tuple[Any, Any]]:
    """The settings on which two sweeps differ, over the runs of the (setting, method, norm)
    groups both have: field -> (A's value, B's value), a sorted list where a side's runs
    disagree among themselves; the grid's axes (tasks, seeds) and paths are left out."""
    def group(run: FinishedRun) -> tuple[str, str, str]:
        return run.config["setting"], run.config["method"], run.config["norm"]

    shared = {group(r) for r in a} & {group(r) for r in b}

    def values(runs: list[FinishedRun]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for run in runs:
            if group(run) in shared:
                for k, v in run.config.items():
                    if k not in IGNORED_IN_DIFF:
                        out.setdefault(k, set()).add(_json_text(v))
        return out

    def shown(v: set[str] | None) -> Any:
        return "-" if not v else next(iter(v)) if len(v) == 1 else sorted(v)

    va, vb = values(a), values(b)
    return {k: (shown(va.get(k)), shown(vb.get(k))) for k in sorted(set(va) | set(vb))
            if va.get(k) != vb.get(k)}


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def versus_frame(a: tuple[Layout, list[FinishedRun]], b: tuple[Layout, list[FinishedRun]],
                 select: str = "last") -> pd.DataFrame:
    """VERSUS_COLUMNS: sweep B against sweep A, runs paired by setting, row (task; multi-domain:
    the domain), method, norm and seed, accuracies in percent at the evaluation `select`
    picks. Per (setting, method, norm) and row: n pairs, the means of A and B, B - A with its
    95% t interval; then a row `all` with every pair over rows x seeds and the two-sided
    Wilcoxon signed-rank test, and a row `task means` over the rows' mean differences
    (`stats.paired_comparison`). Only pairs present in both count."""
    sides = []
    for label, (layout, runs) in (("A", a), ("B", b)):
        scores, _ = selected_scores(runs, layout, select)
        sides.append(scores.assign(side=label))
    frame = pd.concat(sides, ignore_index=True)
    frame["acc"] = frame["acc"].round(9)
    per_row, overall = paired_comparison(frame, "side", "B", "A",
                                         within=["setting", "method", "norm"], task="row",
                                         value="acc")
    group = ["setting", "method", "norm"]
    pairs = frame.pivot_table(index=[*VERSUS_KEYS, "seed"], columns="side",
                              values="acc").dropna().reset_index()
    rows = per_row.merge(pairs.groupby(list(VERSUS_KEYS))[["A", "B"]].mean().reset_index(),
                         on=list(VERSUS_KEYS))
    means = pd.concat([pairs.groupby(group)[["A", "B"]].mean().assign(unit="pairs"),
                       rows.groupby(group)[["A", "B"]].mean().assign(unit="tasks")])
    overall = overall.merge(means.reset_index(), on=[*group, "unit"])
    records = []
    for key, ov in overall.groupby(group, sort=False):  # a group's rows, then its overall rows
        records += rows[(rows[group] == pd.Series(dict(zip(group, key, strict=True))))
                        .all(axis=1)].to_dict("records")
        records += [{**r, "row": OVERALL_ROWS[r["unit"]]} for r in ov.to_dict("records")]
    out = pd.DataFrame(records).rename(columns={"A": "mean_a", "B": "mean_b"})
    out = out.reindex(columns=list(VERSUS_COLUMNS))
    return out.round({c: 4 for c in ("mean_a", "mean_b", "mean_diff", "ci_low", "ci_high")})


VERSUS_COLUMNS = ("setting", "method", "norm", "row", "n", "mean_a", "mean_b", "mean_diff",
                  "ci_low", "ci_high", "n_zero", "W", "p_value", "p_method")
VERSUS_GATES = "versus_gates.csv"


def _run_label(run: FinishedRun, layout: Layout) -> str:
    cfg = run.config
    return f"{run_task(run, layout)} {cfg['method']}/{cfg['norm']} s{cfg['seed']}"


def _cell_key(run: FinishedRun) -> tuple[Any, ...]:
    """What pairs a run with its partner in another sweep: setting, task, method, norm, seed."""
    return tuple(run.config.get(k) for k in ("setting", "source", "target", "method", "norm",
                                              "seed"))


def versus_gates(a: list[FinishedRun], b: list[FinishedRun]
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The BIN gates of the runs of sweeps A and B whose partner in the other sweep (same
    setting, task, method, norm and seed) has gate records too, so both sides pool the same
    cells: (per layer, `gates_frame` columns; totals, `gate_totals_frame` columns), each with
    `sweep` = "A" or "B" first. Both empty unless paired runs of both sweeps have gates.csv."""

    def with_gates(runs: list[FinishedRun]) -> set[tuple[Any, ...]]:
        return {_cell_key(r) for r in runs if (r.run_dir / GATES_RECORD).is_file()}

    shared = with_gates(a) & with_gates(b)
    paired = {label: [r for r in runs if _cell_key(r) in shared]
              for label, runs in (("A", a), ("B", b))}

    def pooled(frame_of: Callable[[list[FinishedRun]], pd.DataFrame]) -> pd.DataFrame:
        parts = [frame_of(runs).assign(sweep=label) for label, runs in paired.items()]
        parts = [p for p in parts if len(p)]
        if len(parts) < 2:  # gates on one side only: nothing to set them against
            return pd.DataFrame()
        frame = pd.concat(parts, ignore_index=True)
        return frame[["sweep", *frame.columns.drop("sweep")]]

    return pooled(gates_frame), pooled(gate_totals_frame)


def write_versus(a_dir: str | Path, b_dir: str | Path, out_dir: str | Path,
                 select: str = "last") -> list[Path]:
    """versus.csv/.md in `out_dir`: sweep B against sweep A (`versus_frame`), headed by the
    settings on which they differ (`config_difference`); with gate records on both sides also
    versus_gates.csv and a gates section in versus.md (`versus_gates`). Returns the paths
    written."""
    rule = get_rule(select)
    (la, ra, rec_a), (lb, rb, rec_b) = (load_sweep(Path(d), trials=True) for d in (a_dir, b_dir))
    # a search's trial per cell, chosen by the rule (`tables.trials`; last: trial 0)
    ra, rb = chosen_runs(ra, rec_a, rule.name), chosen_runs(rb, rec_b, rule.name)
    table = versus_frame((la, ra), (lb, rb), rule.name)
    if table.empty:
        raise UserError(f"no run of {b_dir} has a partner in {a_dir} (same task, method, "
                        "norm and seed, both finished)")
    diff = config_difference(ra, rb)
    what = "; ".join(f"{k}: {va} (A) vs {vb} (B)" for k, (va, vb) in diff.items()) or "nothing"
    out_dir = Path(out_dir)
    written = [write_csv_atomic(table, out_dir / "versus.csv", index=False)]
    shown = pd.DataFrame({
        "method/norm": [f"{r['setting']} {r['method']}/{r['norm']}" for r in table.to_dict("records")],
        "task": table["row"], "n": table["n"].astype(int),
        "A": table["mean_a"].map("{:.1f}".format), "B": table["mean_b"].map("{:.1f}".format),
        "B - A": [signed(v, 2) for v in table["mean_diff"]],
        "95% CI (t)": [interval(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"],
                                                           strict=True)],
        "Wilcoxon signed-rank": [wilcoxon_text(r) if r["row"] in OVERALL_ROWS.values() else ""
                                 for r in table.to_dict("records")],
    }).set_index("method/norm")
    note = (f"A = `{a_dir}`, B = `{b_dir}`; they differ in {what}. Runs are paired by task "
            "(multi-domain: domain), method, norm and seed; accuracies in percent at the "
            f"evaluation `--select {rule.name}` picks ({rule.text}). Per task: n "
            "pairs, the means, B - A and its 95% Student-t interval; row `all`: every pair "
            "and the two-sided Wilcoxon signed-rank test; row `task means`: the tasks as the "
            "units, the mean of their mean differences, its t interval over tasks and the "
            "Wilcoxon test of those means. A difference is a finding when its interval "
            "excludes 0 or p < 0.05 with the n shown.")
    partners = {_cell_key(r) for r in rb} & {_cell_key(r) for r in ra}
    pairs: dict[str, list[FinishedRun]] = {}
    for runs, layout in ((ra, la), (rb, lb)):
        for r in runs:
            if _cell_key(r) in partners:
                pairs.setdefault(_run_label(r, layout), []).append(r)
    note += " " + provenance_note(pairs, "A/B pairs")
    sections = [("Accuracy", shown)]
    layers, totals = versus_gates(ra, rb)
    if not layers.empty:
        written.append(write_csv_atomic(layers.round(6), out_dir / VERSUS_GATES, index=False))
        sections.append((GATES_SECTION, _gate_totals_table(totals)))
    else:  # no gates now: a figure and table of an earlier `versus` into out_dir would mislead
        for stale in (out_dir / VERSUS_GATES, (out_dir / VERSUS_GATES).with_suffix(".png")):
            stale.unlink(missing_ok=True)
    written.insert(1, write_markdown_parts(out_dir / "versus.md", "B against A", note,
                                            sections, None))
    return written


GATES_SECTION = (
    "BIN gates of the paired runs (mean over runs of each run's network-wide numbers, every "
    "channel weighted equally; per layer in versus_gates.csv)")


def _gate_totals_table(totals: pd.DataFrame) -> pd.DataFrame:
    """`versus_gates` totals for Markdown: rho as 3 decimals, the shares in percent."""

    return pd.DataFrame({
        "sweep": totals["sweep"],
        "method/norm": [f"{r['setting']} {r['method']}/{r['norm']}"
                        for r in totals.to_dict("records")],
        "runs": totals["n_runs"].astype(int),
        "mean rho": totals["mean"].map("{:.3f}".format),
        f"% rho < {LOW}": (100 * totals[f"frac_below_{LOW}"]).map("{:.2f}".format),
        f"% rho > {HIGH}": (100 * totals[f"frac_above_{HIGH}"]).map("{:.2f}".format),
    }).set_index("sweep")