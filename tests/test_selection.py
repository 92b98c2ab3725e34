"""Model-selection rules over a run's logged evaluations."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from domadapt.errors import UserError
from domadapt.selection import RULES, get_rule, select, select_runs, selection_table

NAN = math.nan

# One run's log: each validator prefers a different evaluation.
ROWS = [
    {"iter": 100, "target_acc": 0.50, "val_source": 0.80, "val_entropy": 0.9, "val_snd": 2.0,
     "val_dev": 0.70},
    {"iter": 200, "target_acc": 0.70, "val_source": 0.95, "val_entropy": 0.4, "val_snd": 2.5,
     "val_dev": 0.40},
    {"iter": 300, "target_acc": 0.65, "val_source": 0.90, "val_entropy": 0.2, "val_snd": 3.1,
     "val_dev": 0.55},
    {"iter": 400, "target_acc": 0.60, "val_source": 0.85, "val_entropy": 0.3, "val_snd": 2.9,
     "val_dev": 0.30},
]


@pytest.mark.parametrize(("rule", "expected_iter"), [
    ("last", 400),     # final evaluation
    ("source", 200),   # highest source-validation accuracy
    ("entropy", 300),  # lowest entropy
    ("snd", 300),      # highest SND
    ("dev", 400),      # lowest DEV risk
    ("oracle", 200),   # highest target accuracy
])
def test_each_rule_picks_the_evaluation_it_prefers(rule, expected_iter):
    assert select(ROWS, rule)["iter"] == expected_iter
    shuffled = pd.DataFrame(ROWS).sample(frac=1.0, random_state=0)  # order does not matter
    assert select(shuffled, rule)["iter"] == expected_iter


def test_rule_directions_and_only_oracle_uses_target_labels():
    assert {n for n, r in RULES.items() if r.uses_target_labels} == {"oracle"}
    assert not RULES["entropy"].higher_is_better and not RULES["dev"].higher_is_better
    assert RULES["snd"].higher_is_better and RULES["source"].higher_is_better
    assert "target labels" in RULES["oracle"].label and RULES["snd"].label == "snd"


def test_ties_go_to_the_earliest_evaluation():
    rows = [{"iter": 300, "target_acc": 0.6, "val_entropy": 0.2},
            {"iter": 100, "target_acc": 0.6, "val_entropy": 0.2},
            {"iter": 200, "target_acc": 0.5, "val_entropy": 0.5}]
    assert select(rows, "oracle")["iter"] == 100
    assert select(rows, "entropy")["iter"] == 100


def test_empty_cells_are_skipped_not_scored():
    rows = [{"iter": 100, "target_acc": 0.5, "val_dev": ""},      # as read from a CSV
            {"iter": 200, "target_acc": 0.6, "val_dev": 0.9},
            {"iter": 300, "target_acc": 0.7, "val_dev": None}]
    assert select(rows, "dev")["iter"] == 200


def test_unknown_rule_is_a_one_line_user_error():
    with pytest.raises(UserError, match="unknown --select rule 'no-such-rule'; choose from last, "):
        get_rule("no-such-rule")


@pytest.mark.parametrize("rule", ["source", "dev"])
def test_rule_without_its_column_names_what_is_missing(rule):
    rows = [{"iter": 100, "target_acc": 0.5, "val_source": NAN, "val_dev": NAN}]
    col = RULES[rule].column
    msg = (f"--select {rule} needs {col}, which these runs did not record "
           r"\(train with --source-val-fraction > 0\)")
    with pytest.raises(UserError, match=msg) as err:
        select(rows, rule)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=f"needs {col}"):  # column absent altogether
        select([{"iter": 1, "target_acc": 0.5}], rule)


def _runs() -> pd.DataFrame:
    rows = []
    for method, norm, seed, accs in [("dann", "bn", 0, (0.5, 0.7, 0.6)),
                                     ("dann", "bn", 1, (0.4, 0.5, 0.6)),
                                     ("dann", "bin", 0, (0.8, 0.6, 0.7))]:
        for i, acc in enumerate(accs):
            rows.append({"task": "A->B", "method": method, "norm": norm, "seed": seed,
                         "iter": 100 * (i + 1), "target_acc": acc,
                         "val_entropy": [0.3, 0.1, 0.2][i], "val_dev": NAN})
    return pd.DataFrame(rows)


BY = ["task", "method", "norm", "seed"]


def test_select_runs_picks_one_row_per_run():
    picked = select_runs(_runs(), "entropy", BY)
    assert len(picked) == 3
    assert picked["iter"].tolist() == [200, 200, 200]
    assert sorted(picked["target_acc"]) == [0.5, 0.6, 0.7]
    assert set(picked["selected_by"]) == {"entropy"}


def test_select_runs_counts_the_runs_that_lack_the_column():
    frame = _runs()
    frame.loc[(frame.norm == "bn") & (frame.seed == 0), "val_dev"] = 0.5
    with pytest.raises(UserError, match="needs val_dev, which 2 of 3 runs did not record"):
        select_runs(frame, "dev", BY)


def test_selection_table_reports_mean_and_regret_against_the_oracle():
    table = selection_table(_runs(), BY).set_index(["rule", "norm"])
    # bn: oracle picks 0.7 and 0.6 (mean 0.65); last picks 0.6 and 0.6; entropy 0.7 and 0.5.
    # bin: oracle 0.8, last 0.7, entropy 0.6.
    assert table.loc[("last", "bn"), "target_acc"] == pytest.approx(0.60)
    assert table.loc[("last", "bn"), "regret"] == pytest.approx(0.05)
    assert table.loc[("entropy", "bin"), "regret"] == pytest.approx(0.2)
    assert table.loc[("oracle (uses target labels)", "bn"), "regret"] == pytest.approx(0.0)
    assert table.loc[("last", "bn"), "runs"] == 2
    assert "dev" not in table.index.get_level_values("rule")  # not recorded: left out
    assert table.loc[("oracle (uses target labels)", "bin"), "uses_target_labels"]
