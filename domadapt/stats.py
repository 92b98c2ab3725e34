"""Paired statistics over seeds: is norm A better than norm B, is method A better than B?

Runs are paired when they share task, seed and the `within` columns (e.g. the method when
comparing norms), and differ only in the compared factor; the difference is a - b.

- Per task: n paired seeds, mean difference and a 95% confidence interval from Student's t
  on the per-seed differences, mean +- t_{0.975, n-1} * sd / sqrt(n) (sd with ddof = 1);
  empty (NaN) when n < 2.
- Over all tasks x seeds: the number of pairs and a two-sided Wilcoxon signed-rank test
  (`scipy.stats.wilcoxon`). Zero differences are discarded before ranking (Wilcoxon's
  convention, zero_method="wilcox") and counted in `n_zero`. The p-value is exact (the
  null distribution of the rank sum) when at most 50 non-zero differences remain and no two
  |d| are tied, else the normal approximation with tie correction (no continuity
  correction); `p_method` says which. Empty when no non-zero difference remains.
- Over tasks: the per-task mean differences as the units, since the seeds of one task share
  its data and are no independent draws of the task population: n tasks, the mean of the
  task means, a t interval over them (n_tasks - 1 degrees of freedom) and the Wilcoxon test
  of them. Usually the more conservative of the two when the effect varies from task to task; with a
  full grid (every task the same number of seeds) both have the same mean.

Differences and task means are rounded to `DECIMALS` decimals before testing, so float noise
(50.1 - 50.0 != 70.1 - 70.0; a mean of 0.1, 0.2, -0.3 of 2e-15) neither hides a zero nor
breaks a tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from domadapt.errors import UserError

__all__ = ["EXACT_MAX_N", "all_comparisons", "holm", "paired_comparison",
           "paired_differences", "t_interval", "wilcoxon_signed_rank"]

EXACT_MAX_N = 50
DECIMALS = 9


def t_interval(d: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean of `d`: mean +- t_{(1+level)/2, n-1} sd / sqrt(n);
    (nan, nan) when len(d) < 2."""
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2:
        return float("nan"), float("nan")
    half = sps.t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return float(d.mean() - half), float(d.mean() + half)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (Holm, 1979), in the input order:
    sorted ascending p_(1) <= ... <= p_(m), adjusted p_(i) = max_{j <= i} min(1, (m - j + 1)
    p_(j)). Rejecting where adjusted p < alpha keeps the family-wise error rate at alpha. NaN
    p-values (no test) stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def wilcoxon_signed_rank(d: Sequence[float] | np.ndarray) -> dict[str, float | int | str]:
    """Two-sided Wilcoxon signed-rank test of `d` (see the module docstring): keys n_zero,
    W (the smaller of the positive and negative rank sums), p_value, p_method."""
    d = np.asarray(d, dtype=np.float64)
    nonzero = d[d != 0]
    out: dict[str, float | int | str] = {"n_zero": int(d.size - nonzero.size),
                                         "W": float("nan"), "p_value": float("nan"),
                                         "p_method": ""}
    if nonzero.size == 0:
        return out
    ties = np.unique(np.abs(nonzero)).size < nonzero.size
    method = "exact" if nonzero.size <= EXACT_MAX_N and not ties else "asymptotic"
    res = sps.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided", method=method)
    out.update(W=float(res.statistic), p_value=float(res.pvalue),
               p_method="exact" if method == "exact" else "normal approximation")
    return out


def paired_differences(
    frame: pd.DataFrame,
    factor: str,
    a: str,
    b: str,
    *,
    within: Sequence[str] = (),
    task: str = "task",
    seed: str = "seed",
    value: str = "accuracy",
) -> pd.DataFrame:
    """Columns *within, task, seed, diff (= value at factor a - value at factor b), one row
    per (within, task, seed) that has both a run with `factor == a` and one with `== b`;
    unpaired runs are dropped. Two runs for one key -> UserError."""
    keys = [*within, task, seed]
    missing = [c for c in [*keys, factor, value] if c not in frame.columns]
    if missing:
        raise UserError(f"comparison table lacks column(s) {', '.join(missing)}")
    sub = frame[frame[factor].isin([a, b])]
    dup = sub.duplicated([*keys, factor])
    if dup.any():
        row = sub[dup].iloc[0]
        raise UserError(f"two runs for {factor}={row[factor]} at "
                        + ", ".join(f"{k}={row[k]}" for k in keys))
    wide = sub.pivot(index=keys, columns=factor, values=value)
    if a not in wide.columns or b not in wide.columns:
        return pd.DataFrame(columns=[*keys, "diff"])
    diff = (wide[a] - wide[b]).dropna().round(DECIMALS).rename("diff")
    return diff.reset_index()


def paired_comparison(
    frame: pd.DataFrame,
    factor: str,
    a: str,
    b: str,
    *,
    within: Sequence[str] = (),
    task: str = "task",
    seed: str = "seed",
    value: str = "accuracy",
    level: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per_task, overall) comparison of `factor` a vs b, separately for each value of the
    `within` columns.

    per_task columns: *within, comparison ("factor a - b"), task, n, mean_diff, ci_low,
    ci_high (t interval at `level`). overall: two rows per `within` value (module docstring),
    columns *within, comparison, unit, n, n_zero, mean_diff, ci_low, ci_high, W, p_value,
    p_method: unit "pairs", n = all tasks x seeds, no interval; unit "tasks", n = tasks, the
    interval and test over the per-task mean differences.
    """
    label = f"{factor} {a} - {b}"
    diffs = paired_differences(frame, factor, a, b, within=within, task=task, seed=seed,
                               value=value)
    per_task, overall = [], []
    outer = diffs.groupby(list(within), sort=True) if within else [((), diffs)]
    for key, part in outer:
        key = key if isinstance(key, tuple) else (key,)
        head = dict(zip(within, key, strict=True))
        for t, g in part.groupby(task, sort=True):
            lo, hi = t_interval(g["diff"], level)
            per_task.append({**head, "comparison": label, task: t, "n": len(g),
                             "mean_diff": g["diff"].mean(), "ci_low": lo, "ci_high": hi})
        task_means = part.groupby(task, sort=True)["diff"].mean().round(DECIMALS).to_numpy()
        for unit, d, (lo, hi) in (("pairs", part["diff"].to_numpy(), (math.nan, math.nan)),
                                  ("tasks", task_means, t_interval(task_means, level))):
            overall.append({**head, "comparison": label, "unit": unit, "n": len(d),
                            "mean_diff": d.mean() if len(d) else math.nan, "ci_low": lo,
                            "ci_high": hi, **wilcoxon_signed_rank(d)})
    per_task_cols = [*within, "comparison", task, "n", "mean_diff", "ci_low", "ci_high"]
    overall_cols = [*within, "comparison", "unit", "n", "n_zero", "mean_diff", "ci_low",
                    "ci_high", "W", "p_value", "p_method"]
    return (pd.DataFrame(per_task, columns=per_task_cols),
            pd.DataFrame(overall, columns=overall_cols))


def all_comparisons(
    frame: pd.DataFrame,
    *,
    baseline_norm: str = "bn",
    baseline_method: str = "source-only",
    task: str = "task",
    seed: str = "seed",
    value: str = "accuracy",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every pair the comparison tables report, stacked: each norm vs `baseline_norm` within
    each method, and each method vs `baseline_method` within each norm. `frame`: one row per
    run with columns method, norm, task, seed, `value`. The `within` value goes to a column
    `within` (e.g. "method=dann")."""
    per_task, overall = [], []
    for factor, base, other in (("norm", baseline_norm, "method"),
                                ("method", baseline_method, "norm")):
        if factor not in frame.columns:
            raise UserError(f"comparison table lacks column {factor}")
        for level_a in sorted(set(frame[factor]) - {base}):
            pt, ov = paired_comparison(frame, factor, level_a, base, within=[other],
                                       task=task, seed=seed, value=value)
            for part, out in ((pt, per_task), (ov, overall)):
                part.insert(0, "within", other + "=" + part.pop(other).astype(str))
                out.append(part)
    if not per_task:
        return pd.DataFrame(), pd.DataFrame()
    return pd.concat(per_task, ignore_index=True), pd.concat(overall, ignore_index=True)
