"""Paired comparisons: norm vs the baseline norm and method vs source-only over paired seeds
(`domadapt.stats`), and the provenance of the runs they pair."""

from __future__ import annotations

from typing import Any

import pandas as pd

from domadapt.config import SETTINGS
from domadapt.stats import all_comparisons
from domadapt.tables.records import BASELINE_METHOD, FinishedRun, Layout, run_task

AVG = "Avg"
BASELINE_NORM = "bn"
# What a run's numbers depend on besides its config (config.json, `domadapt.provenance`):
# runs compared with each other should share them (`provenance_note`).
PROVENANCE_FIELDS = {"cpu_capability": "CPU kernel set", "code": "code version", "host": "host"}
ALL_PAIRS = "all"  # the `task` of a comparison's overall row over all (task, seed) pairs
OVER_TASKS = "task means"  # ... and of its row over the per-task mean differences
OVERALL_ROWS = {"pairs": ALL_PAIRS, "tasks": OVER_TASKS}  # `stats.paired_comparison` units
COMPARISON_COLUMNS = ("setting", "comparison", "within", "task", "n", "mean_diff", "ci_low",
                      "ci_high", "n_zero", "W", "p_value", "p_method")

def comparison_frame(scores: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """COMPARISON_COLUMNS, per setting (`stats.all_comparisons` over the accuracies in
    percent, a row = a task or a domain: multi-domain's test splits, dg's held-out domains):
    for each comparison its per-task rows
    (n paired seeds, mean difference, 95% t interval) in table order, then a row with task
    `all`: n = pairs over tasks x seeds, their mean difference and Wilcoxon signed-rank test,
    and one with task `task means`: n = tasks, the per-task mean differences' mean, 95% t
    interval and Wilcoxon test (`stats.paired_comparison`). Multi-domain adds, after the
    domains, a row `Avg`: per run (seed) its mean over the domains, paired by seed, so the
    independent units are the trained models (the domains of one run share its model). A dg
    row is its own model, like a transfer task, so dg needs no such row."""
    method = (BASELINE_METHOD if BASELINE_METHOD in layout.methods or not layout.methods
              else layout.methods[0])
    order = {label: i for i, label in enumerate(
        [layout.task_label(s, t) for s, t in layout.tasks] + list(layout.domains) + [AVG])}
    records: list[dict[str, Any]] = []
    for setting in SETTINGS:
        frame = scores[scores["setting"] == setting].rename(columns={"row": "task",
                                                                     "acc": "accuracy"})
        # k/N in percent carries float noise (57.00000000000001): rounded, equal accuracies
        # give a zero difference (and `stats` rounds the differences, so equal ones tie)
        frame["accuracy"] = frame["accuracy"].round(9)
        if frame.empty:
            continue
        per_task, overall = all_comparisons(frame, baseline_norm=baseline_norm(layout),
                                            baseline_method=method)
        if overall.empty:  # nothing to compare (e.g. one norm, one method)
            continue
        if setting == "multidomain":  # each run's mean over its domains, paired by seed
            runs = (frame.groupby(["method", "norm", "seed"], as_index=False)["accuracy"]
                    .mean().assign(task=AVG))
            per_run, _ = all_comparisons(runs, baseline_norm=baseline_norm(layout),
                                         baseline_method=method)
            per_task = pd.concat([per_task, per_run], ignore_index=True)
        records += stack_comparison(per_task, overall, setting, order)
    out = pd.DataFrame(records, columns=list(COMPARISON_COLUMNS))
    return out.round({"mean_diff": 4, "ci_low": 4, "ci_high": 4})


def stack_comparison(per_task: pd.DataFrame, overall: pd.DataFrame, setting: str,
                     order: dict[str, int]) -> list[dict[str, Any]]:
    """COMPARISON_COLUMNS records of one setting from `stats` (per_task, overall) frames with
    a `within` column: each comparison's per-task rows in `order`, then its overall rows
    (task `all`, `task means`)."""
    records: list[dict[str, Any]] = []
    for (label, within), ov in overall.groupby(["comparison", "within"], sort=False):
        mine = per_task[(per_task["comparison"] == label) & (per_task["within"] == within)]
        mine = mine.sort_values("task", key=lambda t: t.map(order), kind="stable")
        records += [{**r, "setting": setting} for r in mine.to_dict("records")]
        records += [{**r, "setting": setting, "task": OVERALL_ROWS[r["unit"]]}
                    for r in ov.to_dict("records")]
    return records


def provenance_note(groups: dict[str, list[FinishedRun]], unit: str) -> str:
    """One sentence for a comparison's notes: how many of the `groups` (the runs a comparison
    pairs with each other, e.g. one task and seed) mix runs that differ in CPU kernel set,
    code version or host, naming them; and how many runs predate these records."""
    paired = {name: runs for name, runs in groups.items() if len(runs) > 1}
    mixed = []
    for name, runs in paired.items():
        differ = [f"{label} {' / '.join(sorted(str(v) for v in values))}"
                  for key, label in PROVENANCE_FIELDS.items()
                  if len(values := {r.provenance.get(key) for r in runs}) > 1]
        if differ:
            mixed.append(f"{name} ({'; '.join(differ)})")
    text = (f"Provenance: {len(mixed)} of {len(paired)} {unit} pair runs that differ in CPU "
            f"kernel set, code version or host")
    text += (f": {', '.join(mixed)}; such pairs do not share their floating-point rounding."
             if mixed else ".")
    runs = {r.run_dir: r for group in paired.values() for r in group}.values()
    if old := sum(r.provenance.get("code") is None for r in runs):
        text += (f" {old} of {len(runs)} runs were made before code version and host were "
                 "recorded (shown as None).")
    return text


def pairing_groups(runs: list[FinishedRun], layout: Layout) -> dict[str, list[FinishedRun]]:
    """The runs a sweep's comparisons pair with each other: one group per setting, task and
    seed (BIN - BN pairs within a method, DANN - source-only within a norm)."""
    groups: dict[str, list[FinishedRun]] = {}
    for run in runs:
        groups.setdefault(f"{run_task(run, layout)} s{run.config['seed']}", []).append(run)
    return groups


def baseline_norm(layout: Layout) -> str:
    """The norm every other norm is compared with: bn when the sweep has it."""
    return BASELINE_NORM if BASELINE_NORM in layout.norms else layout.norms[0]


def count_label(layout: Layout, setting: str) -> str:
    """`BIN >= BN` (`IN / BIN >= BN` with several norms beside the baseline in the tables of
    `setting`)."""
    base = baseline_norm(layout)
    others = [n for n in layout.norms_shown(setting) if n != base]
    return f"{' / '.join(n.upper() for n in others)} >= {base.upper()}"


def other_norms(layout: Layout, base: str) -> list[str]:
    return [n for n in layout.norms if n != base]