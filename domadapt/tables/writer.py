"""The writer: every table of a sweep into its results directory (`write_tables`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from domadapt.selection import get_rule
from domadapt.tables.comparisons import (
    AVG,
    OVER_TASKS,
    baseline_norm,
    comparison_frame,
    count_label,
    pairing_groups,
    provenance_note,
)
from domadapt.tables.frames import (
    RUN_ID,
    gates_frame,
    runs_frame,
    selected_scores,
    selection_frame,
    stability_frame,
    trajectory_frame,
)
from domadapt.tables.records import load_sweep, relative_path
from domadapt.tables.render import (
    TABLES,
    comparison_sections,
    selection_note,
    selection_sections,
    write_csv_atomic,
    write_markdown,
    write_markdown_parts,
)
from domadapt.tables.trials import (
    chosen_runs,
    is_search,
    search_note,
    search_size,
    trial_selection_frame,
    trials_frame,
    trials_note,
    with_trial_column,
)

GATES_BY_LAYER = "gates_by_layer.csv"
STAT_COLUMNS = ("setting", "row", "method", "norm", "n_seeds", "mean", "std")

def write_tables(sweep_dir: str | Path, out_dir: str | Path | None = None,
                 select: str = "last") -> list[Path]:
    """Rebuild every table of the sweep in `sweep_dir` into `out_dir` (default: `sweep_dir`),
    reporting per run the evaluation that rule `select` prefers (module docstring: file names).

    Takes the Layout and the run list from `sweep.json` when present; otherwise every run dir
    under `sweep_dir/runs`, laid out from what finished. Everything is computed before the
    first file is written, so a bad `select` (unknown rule, a column the runs did not record)
    is a UserError that writes nothing. Returns the paths written.
    """
    rule = get_rule(select)  # unknown rule: refused before anything is read
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    layout, every_run, record = load_sweep(sweep_dir, trials=True)
    search = is_search(every_run, record)  # a hyper-parameter search: choose per cell
    runs = chosen_runs(every_run, record, rule.name)
    defaults = chosen_runs(every_run, record, "last")  # trial 0: the rule-free files
    scores, picked = selected_scores(runs, layout, rule.name)
    comparison = comparison_frame(scores, layout)
    selection = (trial_selection_frame(every_run, layout, search_size(record)) if search
                 else selection_frame(runs, layout))
    sfx = "" if rule.name == "last" else f"_select-{rule.name}"
    command = record.get("command")
    chosen = f"Evaluation reported per run (`--select {rule.name}`): {rule.text}."
    chosen += " " + provenance_note(pairing_groups(runs, layout), "(task, seed) groups")
    if search:
        chosen += " " + search_note(every_run, record, rule.name)
    every = runs_frame(every_run, layout, sweep_dir)
    written = [write_csv_atomic(with_trial_column(every, every_run) if search else every,
                                out_dir / "runs.csv", index=False)]
    if search:
        written.append(write_csv_atomic(trials_frame(every_run, layout, sweep_dir,
                                                     search_size(record)),
                                        out_dir / "trials.csv", index=False))
    if picked is not None:
        written.append(write_csv_atomic(_picked_frame(picked, rule.column, sweep_dir),
                                        out_dir / f"runs{sfx}.csv", index=False))
    stats = []
    for setting, build, title, what in TABLES:
        if not layout.has(setting):
            continue
        if picked is not None and not picked.empty and setting not in set(picked["setting"]):
            chosen += (f" {title} runs did not record {rule.column}: no {setting} tables for "
                       "this rule.")
            continue
        stat, table = build(scores, layout, comparison)
        stats.append(stat.assign(setting=setting))
        base = baseline_norm(layout).upper()
        note = (f"{what.capitalize()} in percent, mean ± std over seeds (sample std; the mean "
                f"alone for one seed). `X - {base}`: difference of means; `{count_label(layout, setting)}`:"
                f" rows where X's mean is at least {base}'s, beside it the two-sided Wilcoxon "
                f"signed-rank p over those n rows' mean paired differences (comparison{sfx}.md, "
                f"`{OVER_TASKS}`; there also the test over all (row, seed) pairs). "
                f"`{AVG}`: over the seeds that finished every row. "
                f"{PROTOCOL_NOTES.get(setting, '')}{chosen}")
        heading = f"{title} accuracy (%) on {layout.dataset}"
        if rule.name != "last":
            heading += f", evaluation selected by {rule.label}"
        written.append(write_csv_atomic(table, out_dir / f"{setting}_table{sfx}.csv"))
        written.append(write_markdown(table, out_dir / f"{setting}_table{sfx}.md", heading,
                                       note, command))
    summary = (pd.concat(stats, ignore_index=True) if stats
               else pd.DataFrame(columns=list(STAT_COLUMNS)))
    summary = summary[list(STAT_COLUMNS)].round({"mean": 4, "std": 4})
    written.append(write_csv_atomic(summary, out_dir / f"summary{sfx}.csv", index=False))
    written.append(write_csv_atomic(comparison, out_dir / f"comparison{sfx}.csv", index=False))
    written.append(write_markdown_parts(
        out_dir / f"comparison{sfx}.md",
        f"Paired comparisons on {layout.dataset}, evaluation selected by {rule.label}",
        COMPARISON_NOTE + " " + (DG_COMPARISON_NOTE if layout.dg else "") + chosen,
        comparison_sections(comparison), command))
    written.append(write_csv_atomic(selection, out_dir / "selection_table.csv", index=False))
    stability = stability_frame(defaults, layout)
    written.append(write_csv_atomic(stability, out_dir / "stability.csv", index=False))
    written.append(write_markdown(
        stability.set_index("setting").round(1), out_dir / "stability.md",
        f"Stability of the reported numbers on {layout.dataset}", STABILITY_NOTE, command))
    trajectory = trajectory_frame(defaults, layout)
    written.append(write_csv_atomic(trajectory, out_dir / "trajectory.csv", index=False))
    written.append(write_markdown(
        trajectory.set_index("setting").round({"target_acc": 1}),
        out_dir / "trajectory.md", f"Accuracy and norm diagnostics over training on "
        f"{layout.dataset}", TRAJECTORY_NOTE, command))
    if not (gates := gates_frame(defaults)).empty:
        written.append(write_csv_atomic(gates.round(6), out_dir / GATES_BY_LAYER, index=False))
    written.append(write_markdown_parts(
        out_dir / "selection_table.md", f"Model selection on {layout.dataset}",
        selection_note(every_run, selection) + (" " + trials_note(every_run, record)
                                                 if search else ""),
        selection_sections(selection, layout), command))
    return written


DG_COMPARISON_NOTE = ("Domain generalization: each held-out domain is its own model, a row "
                      "like a transfer task. ")
PROTOCOL_NOTES = {  # what a setting's rows are, where the title does not say it
    "dg": ("Each row: one source-only (ERM) model per seed trained on every other domain, "
           "pooled, that never read an image of the held-out domain; select with `--select "
           "source` (the held-out part of each training domain, DomainBed's training-domain "
           "validation). "),
}


TRAJECTORY_NOTE = (
    "Per method/norm and evaluated iteration, over the runs (tasks x seeds) that logged it: "
    "n_runs, the mean target accuracy in percent (multi-domain: the domains' mean), and the "
    "means of the norm's diagnostics (BIN: `mean_gate`, the mean gate "
    "rho over all channels, and `gate_frac_below_0.1`). Still moving at the last iteration "
    "means the schedule was too short for it to settle. Target accuracies here are read, "
    "never used to choose anything.")


STABILITY_NOTE = (
    "Percentage points per task and method/norm: `last_mean` and `seed_std`, the mean and "
    "sample std over seeds of the last evaluation's target accuracy (the reported number); "
    "`swing_mean` / `swing_max`, the range (max - min) of each run's target accuracy over its "
    "evaluations from mid-training on (iter >= iters / 2), averaged over seeds / the largest. "
    "Where the swing or the seed std is as large as a difference between columns, that "
    "difference says when training stopped, not which method is better.")


COMPARISON_NOTE = (
    "Paired differences a - b in percentage points: runs are paired when they share the task "
    "(multi-domain: the domain), the seed and the `within` factor. Per task: n paired seeds, "
    "their mean difference and a 95% confidence interval from Student's t, mean ± t_{0.975, "
    "n-1} sd / sqrt(n) (not a bootstrap; empty for one seed). Row `all`: n pairs over all "
    "tasks x seeds, their mean difference and a two-sided Wilcoxon signed-rank test (zero "
    "differences dropped; p exact without ties up to 50 pairs, else the normal approximation). "
    "Row `task means`: the tasks as the units (the seeds of one task share its data): n tasks, "
    "the mean of their mean differences, its 95% t interval over tasks and the Wilcoxon test of "
    "those n means; usually the more conservative row when the effect varies between tasks. "
    "Multi-domain: the domains of one run share its model, so read `all` and `task means` as "
    "descriptive; its row `Avg` pairs each run's mean over the domains by seed, the trained "
    "models being the independent units. "
    "A difference is a finding when its interval excludes 0 or p < 0.05 with the n shown; a "
    "single seed's difference is not.")


def _picked_frame(picked: pd.DataFrame, column: str | None, sweep_dir: Path) -> pd.DataFrame:
    """The chosen evaluation per run: RUN_ID, iter, target_acc (percent), the rule's column."""
    cols = [*RUN_ID, "iter", "target_acc", *([column] if column != "target_acc" else []),
            "selected_by"]
    out = picked.reindex(columns=cols).rename(columns={"run": "run_dir"})
    out["run_dir"] = [relative_path(Path(d), sweep_dir) for d in out["run_dir"]]
    out["target_acc"] = 100.0 * out["target_acc"]
    return out