"""Selection across the trials of a hyper-parameter search (`sweep --n-hparams K`,
`domadapt.hparam_search`), as DomainBed's model selection chooses across its trials.

A cell (setting, task, method, norm, seed) of a search has K runs, trial 0 being the defaults.
The tables report ONE run per cell, chosen by the rule of `--select` (`domadapt.selection`):

- a rule with a score (source, entropy, snd, dev: no target labels) picks, over every logged
  evaluation of every trial of the cell, the best score (DomainBed's training-domain
  validation picks over trials and steps alike): the trial whose own best evaluation scores
  best, ties to the lowest trial (the defaults first). Its evaluation is then the one the rule
  picks in that run, as without a search.
- `oracle` does the same with the target accuracy: it USES TARGET LABELS, an upper bound,
  labelled wherever it appears and never the default.
- `last` (the default) has no score, so it chooses nothing: each cell's trial 0 at its last
  evaluation, the same numbers a sweep without search reports (what `--n-hparams 1` gives).

A cell is chosen only once all its K trials have finished (K from sweep.json); until then it is
an empty cell, as an unfinished run is, so a choice never changes because more trials came in.
Everything after the choice (tables, paired comparisons, their tests) works on the chosen runs,
so BN and BIN are compared each at the trial its own rule chose. The files that do not name a
rule (stability, trajectory, gates_by_layer) describe trial 0; `runs.csv` lists every trial
(`hparams_trial`), `trials.csv` the searched values of every trial and which rules chose it,
and `selection_table` compares the rules across trials (regret to the oracle across trials).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from domadapt.errors import UserError
from domadapt.selection import RULES, get_rule, selection_table
from domadapt.tables.frames import SELECTION_COLUMNS, evaluations_frame
from domadapt.tables.records import FinishedRun, Layout, relative_path, run_task

TRIAL = "hparams_trial"
CELL = ("setting", "source", "target", "method", "norm", "seed")
# config fields that never count as searched values (identity, paths, bookkeeping)
_NOT_SEARCHED = {"hparams_seed", TRIAL, "root", "source", "target", "method", "norm", "seed",
                 "setting", "dataset", "method_options", "norm_options"}


def trial_of(run: FinishedRun) -> int:
    """The run's trial: `hparams_trial`, 0 for the defaults (and for runs made before)."""
    return int(run.config.get(TRIAL) or 0)


def search_size(record: dict[str, Any]) -> int | None:
    """K of a search sweep's sweep.json; None for an ordinary sweep (or no record)."""
    hparams = record.get("hparams") or {}
    return hparams.get("n_hparams")


def is_search(runs: Sequence[FinishedRun], record: dict[str, Any]) -> bool:
    return search_size(record) is not None or any(trial_of(r) for r in runs)


def cells(runs: Sequence[FinishedRun]) -> dict[tuple, list[FinishedRun]]:
    """Cell -> its runs, trial 0 first; cells in the order their first run comes."""
    out: dict[tuple, list[FinishedRun]] = {}
    for run in runs:
        out.setdefault(tuple(run.config.get(k) for k in CELL), []).append(run)
    return {cell: sorted(trials, key=trial_of) for cell, trials in out.items()}


def trial_score(run: FinishedRun, rule: str) -> float:
    """The score of `rule` at the evaluation it picks in `run` (NaN where the run did not
    record the rule's column)."""
    chosen = get_rule(rule)
    try:
        return float(chosen.select(run.log)[chosen.column])
    except UserError:
        return math.nan


def choose_trials(runs: Sequence[FinishedRun], rule: str, n_hparams: int | None = None
                  ) -> list[FinishedRun]:
    """One run per cell (module docstring): `last` -> trial 0; another rule -> the trial with
    the best score, once the cell has `n_hparams` finished trials (None: whatever finished).
    A cell none of whose trials recorded the rule's column keeps trial 0 (the rule's own check
    then names what is missing). A rule other than `last` needs every run's log.csv."""
    chosen = get_rule(rule)
    if chosen.column is None:
        return [run for run in runs if trial_of(run) == 0]
    unlogged = [run.run_dir for run in runs if run.log is None]
    if unlogged:
        raise UserError(f"--select {chosen.name} needs each run's log.csv, which "
                        f"{len(unlogged)} of {len(runs)} finished runs lack (e.g. "
                        f"{unlogged[0]}); use --select last")
    return [best_trial(trials, rule)[0] for trials in cells(runs).values()
            if n_hparams is None or len(trials) >= n_hparams]  # else its search is not through


def best_trial(trials: Sequence[FinishedRun], rule: str) -> tuple[FinishedRun, float]:
    """(the trial of one cell with the best score of `rule`, that score): the first of the
    best in `trials`' order (trial 0 first); (trials[0], NaN) when none recorded it."""
    chosen = get_rule(rule)
    best, best_score = trials[0], math.nan
    for run in trials:
        score = trial_score(run, rule)
        if math.isnan(score):
            continue
        if math.isnan(best_score) or (score > best_score if chosen.higher_is_better
                                      else score < best_score):
            best, best_score = run, score
    return best, best_score


def chosen_runs(runs: Sequence[FinishedRun], record: dict[str, Any], rule: str
                ) -> list[FinishedRun]:
    """`runs` as they are for an ordinary sweep; one chosen run per cell for a search."""
    if not is_search(runs, record):
        return list(runs)
    return choose_trials(runs, rule, search_size(record))


def trial_selection_frame(runs: Sequence[FinishedRun], layout: Layout,
                          n_hparams: int | None) -> pd.DataFrame:
    """SELECTION_COLUMNS across trials: per rule, the mean target accuracy (percent) of the
    runs it chooses (`choose_trials`, then its evaluation in each) per setting/method/norm,
    and its regret to the oracle chosen across trials. Rules some run did not record are left
    out, per setting."""
    parts = []
    for name in RULES:
        try:
            evals = evaluations_frame(choose_trials(runs, name, n_hparams), layout)
        except UserError:
            continue
        for _, part in ([] if evals.empty else evals.groupby("setting", sort=False)):
            try:
                parts.append(selection_table(part, ["run"], groups=("setting", "method", "norm"),
                                             rules=(name,)))
            except (UserError, ValueError):  # not recorded in this setting
                continue
    if not parts:
        return pd.DataFrame(columns=list(SELECTION_COLUMNS))
    table = pd.concat(parts, ignore_index=True)
    table["target_acc"] *= 100.0
    keys = ["setting", "method", "norm"]
    oracle = table[table["rule"] == RULES["oracle"].label].set_index(keys)["target_acc"]
    table["regret"] = [oracle.get(tuple(r[k] for k in keys), math.nan) - r["target_acc"]
                       for r in table.to_dict("records")]
    order = {RULES[n].label: i for i, n in enumerate(RULES)}
    table = table.sort_values("rule", key=lambda s: s.map(order), kind="stable")
    return (table[list(SELECTION_COLUMNS)].reset_index(drop=True)
            .round({"target_acc": 4, "regret": 4}))


def searched_values(runs: Sequence[FinishedRun]) -> list[str]:
    """The settings that differ between the trials of some cell (core fields and plug-in
    options alike): what the search drew."""
    names: dict[str, None] = {}
    for trials in cells(runs).values():
        flat = [_flat(run.config) for run in trials]
        for key in dict.fromkeys(k for f in flat for k in f):
            if len({repr(f.get(key)) for f in flat}) > 1:
                names[key] = None
    return list(names)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in _NOT_SEARCHED}
    for group in ("method_options", "norm_options"):
        out.update(config.get(group) or {})
    return out


def trials_frame(runs: Sequence[FinishedRun], layout: Layout, sweep_dir: Path,
                 n_hparams: int | None) -> pd.DataFrame:
    """trials.csv: one row per finished trial: its cell, trial, searched values, the last
    evaluation's target accuracy (percent), `chosen_by` (the labels of the rules that chose
    it, the oracle's marked as using target labels) and its run dir."""
    chooser: dict[Path, list[str]] = {}
    for trials in cells(runs).values():
        waiting = n_hparams is not None and len(trials) < n_hparams
        for name, rule in RULES.items():
            if rule.column is None:  # last: trial 0
                for run in trials[:1] if trial_of(trials[0]) == 0 else []:
                    chooser.setdefault(run.run_dir, []).append(rule.label)
                continue
            if waiting or any(run.log is None for run in trials):
                continue
            run, score = best_trial(trials, name)
            if not math.isnan(score):  # a rule these runs did not record chooses nothing
                chooser.setdefault(run.run_dir, []).append(rule.label)
    searched = searched_values(runs)
    rows = []
    for trials in cells(runs).values():
        for run in trials:
            flat = _flat(run.config)
            rows.append({
                "setting": run.config["setting"], "task": run_task(run, layout),
                "method": run.config["method"], "norm": run.config["norm"],
                "seed": run.config["seed"], TRIAL: trial_of(run),
                **{k: flat.get(k) for k in searched},
                "target_acc": round(100.0 * run.metrics["target_acc"], 4),
                "chosen_by": "; ".join(chooser.get(run.run_dir, [])),
                "run_dir": relative_path(run.run_dir, sweep_dir),
            })
    return pd.DataFrame(rows)


def with_trial_column(frame: pd.DataFrame, runs: Sequence[FinishedRun]) -> pd.DataFrame:
    """runs.csv of a search: `hparams_trial` after `seed` (rows in the order of `runs`)."""
    frame = frame.copy()
    frame.insert(list(frame.columns).index("seed") + 1, TRIAL, [trial_of(r) for r in runs])
    return frame


def search_note(runs: Sequence[FinishedRun], record: dict[str, Any], rule: str) -> str:
    """What the tables of a search report, for their notes."""
    n = search_size(record)
    chosen = get_rule(rule)
    size = f"{n} configurations" if n else "several configurations"
    text = (f"Hyper-parameter search: {size} per cell (trial 0 = the defaults; `trials.csv`: "
            "each trial's drawn values and the rules that chose it). ")
    if chosen.column is None:
        return text + ("`--select last` chooses no trial: each cell's trial 0, as without a "
                       "search; `--select source|entropy|snd|dev` choose across trials without "
                       "target labels.")
    text += (f"Each cell reports the trial whose best evaluation by {chosen.label} is the best "
             "of the cell's trials (ties: the lower trial), ")
    text += ("which USES TARGET LABELS: an upper bound, never the headline." if
             chosen.uses_target_labels else "chosen without target labels.")
    if waiting := waiting_cells(runs, record):
        text += f" {waiting} cell(s) wait for all {n} trials and are left empty."
    return text


def waiting_cells(runs: Sequence[FinishedRun], record: dict[str, Any]) -> int:
    """How many cells have fewer finished trials than the search's K."""
    n = search_size(record)
    return sum(len(t) < n for t in cells(runs).values()) if n else 0


def trials_note(runs: Sequence[FinishedRun], record: dict[str, Any]) -> str:
    """The selection table's note on a search."""
    text = ("Across the trials of the hyper-parameter search: each rule chooses per cell the "
            "trial whose evaluation it prefers (`last`: trial 0, the defaults, at its last "
            "evaluation); the regret is to the oracle across trials.")
    if waiting := waiting_cells(runs, record):
        text += (f" {waiting} cell(s) wait for all {search_size(record)} trials: every rule but "
                 "`last` leaves them out until then.")
    return text
