"""Model-selection rules: which of a run's logged evaluations to report.

A run logs one row per evaluation (log.csv) with the columns `iter`, `target_acc` and one
`val_<name>` column per registered validator (`domadapt.validators`); a validator that could
not be computed is an empty cell (NaN). A rule picks one row per run and the tables report
that row's `target_acc`. The rules, in this order (`RULES`):

    last     the final evaluation (largest iter)
    <name>   one per validator, in registry order (source, entropy, snd, dev, then the
             plug-ins'): the best `val_<name>`, highest or lowest as the validator declares
    oracle   highest target accuracy -- USES TARGET LABELS: an upper bound, not a method

Ties (equal scores) go to the EARLIEST evaluation: the rule does not reward training longer
for nothing, and the choice is deterministic. Rows whose validator cell is empty are skipped;
a rule whose column is absent or empty in every row of a run is a UserError naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from domadapt.errors import UserError
from domadapt.validators import VALIDATORS, Validator

__all__ = ["LAST", "ORACLE", "RULES", "SelectionRule", "get_rule", "select", "select_help",
           "select_runs", "selection_table", "validator_rule"]


@dataclass(frozen=True)
class SelectionRule:
    """One rule: maximise or minimise `column` over a run's evaluations (`column` None: take
    the last evaluation)."""

    name: str
    column: str | None
    higher_is_better: bool
    uses_target_labels: bool
    hint: str = ""  # how to get the column recorded, for the error message
    text: str = ""  # what the chosen evaluation is, for the tables' notes
    help: str = ""  # one phrase for the command line's --select help

    @property
    def label(self) -> str:
        """Name for tables; the oracle is marked as using target labels wherever it appears."""
        return f"{self.name} (uses target labels)" if self.uses_target_labels else self.name

    def check(self, frame: pd.DataFrame, by: Sequence[str] = ()) -> None:
        """UserError (one line) unless every run of `frame` (one per value of the columns
        `by`; the whole frame when `by` is empty) has a value in `column` in some row."""
        if self.column is None:
            return
        why = f" ({self.hint})" if self.hint else ""
        if self.column not in frame.columns or frame[self.column].isna().all():
            raise UserError(f"--select {self.name} needs {self.column}, which these runs did "
                            f"not record{why}")
        if by:
            has = frame[self.column].notna().groupby([frame[c] for c in by]).any()
            if not has.all():
                raise UserError(f"--select {self.name} needs {self.column}, which "
                                f"{(~has).sum()} of {len(has)} runs did not record{why}")

    def select(self, rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The chosen evaluation of ONE run's rows, as a dict (ties: earliest iter)."""
        frame = _as_frame(rows)
        if frame.empty:
            raise UserError("no evaluations to select from")
        self.check(frame)
        frame = frame.sort_values("iter", kind="stable").reset_index(drop=True)
        if self.column is None:
            return frame.iloc[-1].to_dict()
        scores = frame[self.column].dropna()
        best = scores.max() if self.higher_is_better else scores.min()
        return frame.loc[scores.index[scores == best][0]].to_dict()


LAST = SelectionRule("last", None, True, False,
                     text="the last evaluation (metrics.json); no target labels used",
                     help="default: the final one, metrics.json")
ORACLE = SelectionRule(
    "oracle", "target_acc", True, True,
    text=("the evaluation with the highest target accuracy. It USES TARGET LABELS: an upper "
          "bound on model selection, not a method, never the headline"),
    help="best target accuracy: USES TARGET LABELS, an upper bound, not a method")


def validator_rule(v: Validator) -> SelectionRule:
    """The rule that picks the evaluation with the best score of validator `v`."""
    best = "highest" if v.higher_is_better else "lowest"
    return SelectionRule(v.name, v.column, v.higher_is_better, False, v.hint,
                         text=f"the evaluation with the {best} {v.help}",
                         help=f"{best} {v.help}" + (f"; {v.hint}" if v.hint else ""))


def _rules() -> dict[str, SelectionRule]:
    """last, one rule per validator (registry order), oracle (validators may not take the names
    `last` and `oracle`: `validators.base.RULE_NAMES`)."""
    rules = [LAST, *(validator_rule(v) for _, v in VALIDATORS.items()), ORACLE]
    return {rule.name: rule for rule in rules}


class _Rules(Mapping[str, SelectionRule]):
    """name -> rule, read from the validator registry at every use (so a validator registered
    at run time is a rule too)."""

    def __getitem__(self, name: str) -> SelectionRule:
        return _rules()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_rules())

    def __len__(self) -> int:
        return len(_rules())


RULES: Mapping[str, SelectionRule] = _Rules()


def select_help() -> str:
    """The --select help: every rule, from the registry."""
    return ("which logged evaluation of each run the tables report: "
            + " | ".join(f"{r.name} ({r.help})" for r in RULES.values())
            + ". Rules other than last write *_select-RULE files beside the default tables")


def get_rule(name: str) -> SelectionRule:
    """The rule called `name`; unknown name -> UserError listing the known ones."""
    try:
        return RULES[name]
    except KeyError:
        raise UserError(f"unknown --select rule {name!r}; choose from "
                        f"{', '.join(RULES)}") from None


def _as_frame(rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if "iter" not in frame.columns and not frame.empty:
        raise UserError("evaluation rows have no 'iter' column")
    # Empty CSV cells ("" or None) are missing values, not scores.
    return frame.replace("", math.nan).infer_objects()


def select(rows: pd.DataFrame | Sequence[Mapping[str, Any]], rule: str) -> dict[str, Any]:
    """The evaluation of one run (its log rows) that rule `rule` prefers."""
    return get_rule(rule).select(rows)


def select_runs(frame: pd.DataFrame, rule: str, by: Sequence[str]) -> pd.DataFrame:
    """One chosen row per run: `frame` holds the log rows of many runs, a run being one value
    of the columns `by` (e.g. ["run"] or ["task", "method", "norm", "seed"]). Every run must
    have the rule's column (else UserError). Adds a column `selected_by` (the rule's label).
    """
    chosen = get_rule(rule)
    frame = _as_frame(frame)
    chosen.check(frame, by)
    picked = [chosen.select(group) for _, group in frame.groupby(list(by), sort=True)]
    out = pd.DataFrame(picked, columns=frame.columns)
    out["selected_by"] = chosen.label
    return out.reset_index(drop=True)


def selection_table(
    frame: pd.DataFrame,
    by: Sequence[str],
    groups: Sequence[str] = ("method", "norm"),
    rules: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Per rule (rows; default: every rule) and group (e.g. method/norm), the mean selected
    `target_acc` over runs and its regret = oracle mean - rule mean (>= 0). Rules whose column
    these runs did not record are left out. Columns: rule, uses_target_labels, *groups, target_acc, regret, runs.
    """
    frame = _as_frame(frame)
    oracle = select_runs(frame, "oracle", by).groupby(list(groups))["target_acc"].mean()
    parts = []
    for name in tuple(RULES) if rules is None else rules:
        try:
            picked = select_runs(frame, name, by)
        except UserError:
            continue
        agg = picked.groupby(list(groups))["target_acc"].agg(["mean", "size"])
        part = pd.DataFrame({"target_acc": agg["mean"], "regret": oracle - agg["mean"],
                             "runs": agg["size"]}).reset_index()
        rule = RULES[name]
        part.insert(0, "uses_target_labels", rule.uses_target_labels)
        part.insert(0, "rule", rule.label)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
