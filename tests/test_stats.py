"""Paired comparisons: t intervals per task; Wilcoxon signed-rank over tasks x seeds and over
the per-task mean differences (with a t interval over tasks)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from domadapt.errors import UserError
from domadapt.stats import all_comparisons, paired_comparison, wilcoxon_signed_rank

T_975_DF2 = 4.302652729911275  # Student t quantile t_{0.975, 2} (printed tables: 4.303)

# Differences bin - bn under dann, by (task, seed): known by construction.
DIFFS = {("T1", 0): 1.0, ("T1", 1): 2.0, ("T1", 2): 3.0,
         ("T2", 0): -0.5, ("T2", 1): 4.0, ("T2", 2): 5.0}


def _table() -> pd.DataFrame:
    rows = []
    for (task, seed), d in DIFFS.items():
        base = 50.0 + 3 * seed + (10 if task == "T2" else 0)
        rows += [
            {"task": task, "seed": seed, "method": "dann", "norm": "bn", "accuracy": base},
            {"task": task, "seed": seed, "method": "dann", "norm": "bin", "accuracy": base + d},
            {"task": task, "seed": seed, "method": "source-only", "norm": "bn",
             "accuracy": base - 5},
            {"task": task, "seed": seed, "method": "source-only", "norm": "bin",
             "accuracy": base - 5 + (0.0 if seed == 0 else 1.0)},
        ]
    return pd.DataFrame(rows)


def _exact_two_sided_p(d: list[float]) -> float:
    """Exact signed-rank p-value by enumerating all 2^n sign patterns (distinct |d|, no 0)."""
    ranks = {v: r for r, v in enumerate(sorted(abs(x) for x in d), start=1)}
    w_minus = sum(ranks[abs(x)] for x in d if x < 0)
    n = len(d)
    w_obs = min(w_minus, n * (n + 1) // 2 - w_minus)
    sums = [sum(s) for k in range(n + 1) for s in itertools.combinations(range(1, n + 1), k)]
    return min(1.0, 2 * sum(s <= w_obs for s in sums) / 2**n)


def test_per_task_t_interval_matches_the_hand_computation():
    per_task, _ = paired_comparison(_table(), "norm", "bin", "bn", within=["method"])
    row = per_task[(per_task.method == "dann") & (per_task.task == "T1")].iloc[0]
    # d = (1, 2, 3): mean 2, sd 1, CI = 2 -+ t_{0.975,2} / sqrt(3).
    assert row["n"] == 3 and row["mean_diff"] == pytest.approx(2.0)
    assert row["comparison"] == "norm bin - bn"
    assert row["ci_low"] == pytest.approx(2 - T_975_DF2 / math.sqrt(3))
    assert row["ci_high"] == pytest.approx(2 + T_975_DF2 / math.sqrt(3))
    row = per_task[(per_task.method == "dann") & (per_task.task == "T2")].iloc[0]
    d = np.array([-0.5, 4.0, 5.0])
    half = T_975_DF2 * math.sqrt(((d - d.mean()) ** 2).sum() / 2) / math.sqrt(3)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))


def test_overall_wilcoxon_matches_the_exact_distribution():
    _, overall = paired_comparison(_table(), "norm", "bin", "bn", within=["method"])
    row = overall[(overall.method == "dann") & (overall.unit == "pairs")].iloc[0]
    # |d| ranks 1..6, the one negative difference (-0.5) has rank 1: W = 1; sign patterns
    # with a negative rank sum <= 1: {} and {1}, so p = 2 * 2 / 64 = 0.0625.
    assert row["n"] == 6 and row["n_zero"] == 0 and row["W"] == 1
    assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
    assert row["p_value"] == pytest.approx(0.0625)
    assert row["p_value"] == pytest.approx(_exact_two_sided_p(list(DIFFS.values())))
    assert row["p_method"] == "exact"
    assert row["mean_diff"] == pytest.approx(sum(DIFFS.values()) / 6)


def test_over_tasks_the_task_means_are_the_units():
    """The `tasks` row: per-task mean differences T1 2.0, T2 17/6; their mean, a t interval
    with 1 degree of freedom, and the exact Wilcoxon p of two positive values (2 / 4)."""
    _, overall = paired_comparison(_table(), "norm", "bin", "bn", within=["method"])
    row = overall[(overall.method == "dann") & (overall.unit == "tasks")].iloc[0]
    means = np.array([2.0, 8.5 / 3])
    half = 12.706204736174707 * means.std(ddof=1) / math.sqrt(2)  # t_{0.975, 1}
    assert row["n"] == 2 and row["mean_diff"] == pytest.approx(means.mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((means.mean() - half,
                                                             means.mean() + half))
    assert row["W"] == 0 and row["p_value"] == pytest.approx(0.5) and row["p_method"] == "exact"


def test_zero_differences_are_dropped_and_counted():
    # source-only: bin - bn = 0 at seed 0, 1 at seeds 1 and 2 (tied |d|): 4 pairs remain.
    _, overall = paired_comparison(_table(), "norm", "bin", "bn", within=["method"])
    row = overall[(overall.method == "source-only") & (overall.unit == "pairs")].iloc[0]
    assert row["n"] == 6 and row["n_zero"] == 2
    assert row["p_method"] == "normal approximation"
    # 4 tied values of rank 2.5, all positive: W = 0, mean 5, tie-corrected variance
    # 4*5*9/24 - (4^3 - 4)/48 = 7.5 - 1.25 = 6.25; z = -5/2.5 = -2.
    phi = 0.5 * math.erfc(2 / math.sqrt(2))
    assert row["p_value"] == pytest.approx(2 * phi)


def test_normal_approximation_with_ties_by_hand():
    d = [1.0, 1.0, 2.0, -3.0, 4.0, 5.0, 6.0, 7.0]
    # Ranks 1.5, 1.5, 3, 4, ..., 8; W- = 4; mean 18; variance 51 - (2^3 - 2)/48 = 50.875.
    z = (4 - 18) / math.sqrt(50.875)
    res = wilcoxon_signed_rank(d)
    assert res["W"] == 4 and res["p_method"] == "normal approximation"
    assert res["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))


def test_ci_is_empty_with_one_seed_and_unpaired_runs_are_dropped():
    frame = _table()
    frame = frame[~((frame.task == "T1") & (frame.seed > 0))]  # T1: seed 0 only
    frame = frame[~((frame.task == "T2") & (frame.seed == 2) & (frame.norm == "bn"))]
    per_task, overall = paired_comparison(frame, "norm", "bin", "bn", within=["method"])
    t1 = per_task[(per_task.method == "dann") & (per_task.task == "T1")].iloc[0]
    assert t1["n"] == 1 and math.isnan(t1["ci_low"]) and math.isnan(t1["ci_high"])
    dann = overall[overall.method == "dann"].set_index("unit")
    assert dann.at["pairs", "n"] == 3 and dann.at["tasks", "n"] == 2
    # over tasks: T1's one difference (1.0) and T2's mean of -0.5 and 4.0 count once each
    assert dann.at["tasks", "mean_diff"] == pytest.approx((1.0 + 1.75) / 2)


def test_all_differences_zero_leaves_the_p_value_empty():
    res = wilcoxon_signed_rank([0.0, 0.0, 0.0])
    assert res["n_zero"] == 3 and math.isnan(res["p_value"]) and res["p_method"] == ""


def test_duplicate_runs_are_a_user_error():
    frame = pd.concat([_table(), _table().iloc[:1]])
    with pytest.raises(UserError, match="two runs for norm=bn at method=dann, task=T1, seed=0"):
        paired_comparison(frame, "norm", "bin", "bn", within=["method"])


def test_all_comparisons_stacks_norm_and_method_pairs():
    per_task, overall = all_comparisons(_table())
    assert set(zip(overall.comparison, overall.within, strict=True)) == {
        ("norm bin - bn", "method=dann"), ("norm bin - bn", "method=source-only"),
        ("method dann - source-only", "norm=bin"), ("method dann - source-only", "norm=bn")}
    bn = overall[(overall.comparison == "method dann - source-only")
                 & (overall.within == "norm=bn") & (overall.unit == "pairs")].iloc[0]
    assert bn["mean_diff"] == pytest.approx(5.0) and bn["n"] == 6
    assert len(per_task) == 4 * 2  # 4 comparisons x 2 tasks


def test_float_noise_neither_hides_a_zero_nor_breaks_a_tie():
    """50.1 - 50.0 and 70.1 - 70.0 differ in float arithmetic, and a task whose differences
    are 0.1, 0.2, -0.3 has a float mean of ~1e-16: rounded, the first two tie (normal
    approximation, not the exact test) and the task mean is a zero (dropped, counted)."""
    rows = []
    for task, seed, bn, bin_ in [("T1", 0, 50.0, 50.1), ("T1", 1, 70.0, 70.1),
                                 ("T2", 0, 60.0, 60.1), ("T2", 1, 60.0, 60.2),
                                 ("T2", 2, 60.3, 60.0), ("T3", 0, 40.0, 41.0)]:
        rows += [{"task": task, "seed": seed, "norm": "bn", "accuracy": bn},
                 {"task": task, "seed": seed, "norm": "bin", "accuracy": bin_}]
    _, overall = paired_comparison(pd.DataFrame(rows), "norm", "bin", "bn")
    pairs, tasks = (overall[overall.unit == u].iloc[0] for u in ("pairs", "tasks"))
    assert pairs["n"] == 6 and pairs["n_zero"] == 0
    assert pairs["p_method"] == "normal approximation"  # |0.1| three times: ties
    assert tasks["n"] == 3 and tasks["n_zero"] == 1  # T2's mean difference is 0
    assert tasks["mean_diff"] == pytest.approx((0.1 + 0.0 + 1.0) / 3)


def test_holm_adjusts_step_down_in_input_order() -> None:
    from domadapt.stats import holm

    # m = 4: sorted 0.01, 0.02, 0.03, 0.04 -> 0.04, 0.06, 0.06 (monotone), 0.06
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = holm([0.01, float("nan"), 0.04])  # NaN: no test, not counted (m = 2)
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
