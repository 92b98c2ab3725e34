"""Rendering: display tables (mean ± std per column, differences, count rows), Markdown
tables and notes, cell formatting, and the atomic CSV / Markdown writers."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from domadapt.io import atomic_write_csv, atomic_write_text
from domadapt.selection import RULES
from domadapt.tables.comparisons import (
    AVG,
    OVER_TASKS,
    OVERALL_ROWS,
    baseline_norm,
    comparison_frame,
    count_label,
    other_norms,
)
from domadapt.tables.records import FinishedRun, Layout


def aggregate(scores: pd.DataFrame, rows: list[str],
              columns: dict[str, tuple[str | None, str]]) -> pd.DataFrame:
    """Mean/std over seeds per row and column, plus the Avg row.

    `scores`: row, method, norm, seed, acc; `columns`: label -> (method or None for any, norm).
    Returns row, column, method, norm, n_seeds, mean, std for every row in `rows` + [Avg] and
    every column (n_seeds 0 and NaN where nothing finished).
    """
    out = []
    for label, (method, norm) in columns.items():
        mine = scores[(scores["norm"] == norm) & ((scores["method"] == method) | (method is None))]
        by_seed = (mine.pivot_table(index="seed", columns="row", values="acc", aggfunc="mean")
                   .reindex(columns=rows))
        complete = by_seed.dropna()  # seeds with every row finished
        for row, values in [*by_seed.items(), (AVG, complete.mean(axis=1))]:
            values = values.dropna()
            out.append({"row": row, "column": label, "method": method, "norm": norm,
                        "n_seeds": len(values),
                        "mean": values.mean() if len(values) else math.nan,
                        "std": values.std(ddof=1) if len(values) > 1 else math.nan})
    return pd.DataFrame(out, columns=["row", "column", "method", "norm", "n_seeds", "mean", "std"])


def display_table(stats: pd.DataFrame, rows: list[str], diffs: dict[str, tuple[str, str]],
                  index_name: str, count_row: str,
                  tests: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """Formatted table: "mean ± std" per column, then each diff column `name: (norm, baseline)`
    placed after its norm's column, and a `count_row` footer (e.g. `BIN >= BN`) counting the
    rows (not Avg) where the norm's mean is at least the baseline's, with the paired test of
    that difference beside it: `7/12 (p=0.34, n=12)` (`tests[name]`: a comparison_frame
    `task means` row: Wilcoxon p over the n rows' mean paired differences; none: n=0)."""
    tests = tests or {}
    mean = stats.pivot(index="row", columns="column", values="mean")
    std = stats.pivot(index="row", columns="column", values="std")
    table = pd.DataFrame(index=pd.Index([*rows, AVG], name=index_name))
    for column in dict.fromkeys(stats["column"]):
        table[column] = [_mean_std(mean.at[r, column], std.at[r, column]) for r in table.index]
    if diffs:
        table.loc[count_row] = ""
    for name, (hi, lo) in diffs.items():
        delta = (mean[hi] - mean[lo]).reindex([*rows, AVG])
        table.insert(table.columns.get_loc(hi) + 1, name, [*map(signed, delta), ""])
        both = delta.reindex(rows).dropna()
        test = tests.get(name, {})
        table.at[count_row, name] = (f"{int((both >= 0).sum())}/{len(both)} "
                                     f"({_p(test.get('p_value', math.nan))}, "
                                     f"n={int(test.get('n', 0))})")
    return table


def _tests(comparison: pd.DataFrame, names: dict[str, tuple[str, str]]
           ) -> dict[str, dict[str, Any]]:
    """`names`: diff column -> (comparison, within or "" for any) -> its `task means` row
    (the test over the per-row mean differences, which the count row counts), where one row
    matches."""
    overall = comparison[comparison["task"] == OVER_TASKS]
    out = {}
    for name, (label, within) in names.items():
        hit = overall[(overall["comparison"] == label)
                      & ((overall["within"] == within) | (within == ""))]
        if len(hit) == 1:
            out[name] = hit.iloc[0].to_dict()
    return out


def transfer_tables(scores: pd.DataFrame, layout: Layout,
                    comparison: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stats, display) of the transfer setting: one column per method/norm; `comparison`
    (comparison_frame, default: computed from `scores`) gives the count row its tests."""
    scores = scores[scores["setting"] == "transfer"]
    if comparison is None:
        comparison = comparison_frame(scores, layout)
    comparison = comparison[comparison["setting"] == "transfer"]
    columns = {f"{m}/{n}": (m, n) for m in layout.methods for n in layout.norms
               if layout.shows("transfer", m, n)}
    rows = [layout.task_label(s, t) for s, t in layout.tasks]
    stats = aggregate(scores, rows, columns)
    base = baseline_norm(layout)
    pairs = {f"{m} {n.upper()} - {base.upper()}": (m, n)
             for m in layout.methods for n in other_norms(layout, base)
             if f"{m}/{n}" in columns and f"{m}/{base}" in columns}
    diffs = {name: (f"{m}/{n}", f"{m}/{base}") for name, (m, n) in pairs.items()}
    tests = _tests(comparison, {name: (f"norm {n} - {base}", f"method={m}")
                                for name, (m, n) in pairs.items()})
    return stats, display_table(stats, rows, diffs, "task", count_label(layout, "transfer"),
                                tests)


def norm_tables(setting: str, index_name: str, scores: pd.DataFrame, layout: Layout,
                comparison: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stats, display) of a source-only setting whose rows are domains (multidomain: each
    domain's test split; dg: each held-out domain): one column per norm the setting runs; the
    count row's tests pair domains x seeds."""
    scores = scores[scores["setting"] == setting]
    if comparison is None:
        comparison = comparison_frame(scores, layout)
    comparison = comparison[comparison["setting"] == setting]
    rows = list(layout.domains)
    shown = layout.norms_shown(setting)
    stats = aggregate(scores, rows, {n: (None, n) for n in shown})
    base = baseline_norm(layout)
    diffs = {f"{n.upper()} - {base.upper()}": (n, base) for n in other_norms(layout, base)
             if {n, base} <= set(shown)}
    tests = _tests(comparison, {name: (f"norm {n} - {base}", "")
                                for name, (n, _) in diffs.items()})
    return stats, display_table(stats, rows, diffs, index_name,
                                count_label(layout, setting), tests)


multidomain_tables = partial(norm_tables, "multidomain", "domain")
dg_tables = partial(norm_tables, "dg", "held-out domain")

TABLES = (  # setting, builder, title, what the numbers are
    ("transfer", transfer_tables, "Transfer", "target accuracy"),
    ("multidomain", multidomain_tables, "Multi-domain", "test accuracy per domain"),
    ("dg", dg_tables, "Domain generalization", "accuracy on the held-out domain"),
)


def comparison_sections(comparison: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One display table per setting: comparison (within), task, n, mean diff, 95% CI, test."""
    sections = []
    for setting, _, title, _ in TABLES:
        part = comparison[comparison["setting"] == setting]
        if part.empty:
            continue
        table = pd.DataFrame({
            "task": part["task"].to_numpy(),
            "n": part["n"].astype(int).to_numpy(),
            "mean diff": [signed(v, 2) for v in part["mean_diff"]],
            "95% CI (t)": [interval(lo, hi) for lo, hi in zip(part["ci_low"], part["ci_high"],
                                                               strict=True)],
            "Wilcoxon signed-rank": [wilcoxon_text(r) if r["task"] in OVERALL_ROWS.values() else ""
                                     for r in part.to_dict("records")],
        }, index=pd.Index([f"{c} ({w})" for c, w in zip(part["comparison"], part["within"],
                                                        strict=True)], name="comparison"))
        sections.append((title, table))
    return sections


def selection_note(runs: list[FinishedRun], selection: pd.DataFrame) -> str:
    missing = []
    for setting, part in selection.groupby("setting", sort=False):
        recorded = {r.split(" ")[0] for r in part["rule"]}
        if left := [name for name in RULES if name not in recorded]:
            missing.append(f"{setting}: {', '.join(left)}")
    unlogged = sum(run.log is None for run in runs)
    return " ".join(filter(None, [
        ("Mean target accuracy (%) of the evaluation each rule selects, over the runs (tasks "
         "x seeds) of each method/norm (multi-domain: the domains' mean); in parentheses the "
         "regret, oracle - rule, in percentage points. The oracle picks by target accuracy: "
         "it USES TARGET LABELS, an upper bound, never the headline."),
        f"Not recorded by every run, so left out: {'; '.join(missing)}." if missing else "",
        f"{unlogged} finished run(s) without log.csv are not included." if unlogged else "",
    ]))


def selection_sections(selection: pd.DataFrame, layout: Layout
                        ) -> list[tuple[str, pd.DataFrame]]:
    """Rows = rules (RULES order), columns = method/norm (multi-domain, dg: the norm)."""
    sections = []
    for setting, _, title, _ in TABLES:
        part = selection[selection["setting"] == setting]
        if part.empty:
            continue
        rules = [r.label for r in RULES.values() if r.label in set(part["rule"])]
        methods = list(layout.methods) if setting == "transfer" else sorted(set(part["method"]))
        table = pd.DataFrame(index=pd.Index(rules, name="rule"))
        for m in methods:
            for n in layout.norms:
                cell = part[(part["method"] == m) & (part["norm"] == n)].set_index("rule")
                if cell.empty:
                    continue
                label = f"{m}/{n}" if setting == "transfer" else n
                table[label] = [f"{cell.at[r, 'target_acc']:.1f} ({cell.at[r, 'regret']:.1f})"
                                if r in cell.index else "" for r in rules]
        sections.append((title, table))
    return sections


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub pipe table of `table` (index as first column), first column left-aligned."""
    header = [table.index.name or "", *map(str, table.columns)]
    body = [[str(i), *map(_cell, row)]
            for i, row in zip(table.index, table.itertuples(index=False))]
    widths = [max(3, *(len(r[c]) for r in [header, *body])) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]
        return "| " + " | ".join(padded) + " |"

    rule = [":" + "-" * (widths[0] - 1), *("-" * (w - 1) + ":" for w in widths[1:])]
    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *map(line, body)]) + "\n"


def write_csv_atomic(frame: pd.DataFrame, path: Path, index: bool = True) -> Path:
    atomic_write_csv(path, frame, index=index)
    return path


def write_markdown(table: pd.DataFrame, path: Path, heading: str, note: str,
                    command: str | None) -> Path:
    parts = [f"# {heading}\n", note + "\n", markdown_table(table)]
    if command:
        parts.append(f"Produced by:\n\n```\n{command}\n```\n")
    atomic_write_text(path, "\n".join(parts))
    return path


def write_markdown_parts(path: Path, heading: str, note: str,
                          sections: list[tuple[str, pd.DataFrame]], command: str | None) -> Path:
    parts = [f"# {heading}\n", note + "\n"]
    for title, table in sections:
        parts += [f"## {title}\n", markdown_table(table)]
    if not sections:
        parts.append("No finished runs to compare yet.\n")
    if command:
        parts.append(f"Produced by:\n\n```\n{command}\n```\n")
    atomic_write_text(path, "\n".join(parts))
    return path


def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.1f}" if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def signed(value: float, digits: int = 1) -> str:
    return "" if pd.isna(value) else f"{value:+.{digits}f}"


def interval(low: float, high: float) -> str:
    return "" if pd.isna(low) else f"[{low:+.2f}, {high:+.2f}]"


def _p(p: float) -> str:
    """A p-value for a table cell: `p=` and 2 decimals from 0.1, else 2 significant digits
    (0.049 and 0.051 stay apart); `p<0.001`; `p=n/a` when untested."""
    if pd.isna(p):
        return "p=n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}" if p < 0.1 else f"p={p:.2f}"


def wilcoxon_text(row: dict[str, Any]) -> str:
    if pd.isna(row["p_value"]):
        return f"no test ({int(row['n_zero'])} zero differences)" if row["n"] else ""
    zeros = f", {int(row['n_zero'])} zero dropped" if row["n_zero"] else ""
    return f"{_p(row['p_value'])} ({row['p_method']}), W={row['W']:g}{zeros}"


def _cell(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)