"""Result tables: the run directories of a sweep -> CSV tables plus a Markdown rendering.

A run counts once its `metrics.json` exists (train writes it last: the done marker); its
`config.json` says what it was. Which rows and columns a table has, and in which order, comes
from the sweep's record (`sweep.json`, a `Layout`), so a partial sweep shows empty cells, not
missing rows. Every file goes through `domadapt.io` (write a temp file, rename), so tables can
be rebuilt at any moment, also while sweeps are writing into the same directory.

Files written into the results directory:

- `runs.csv`: one row per finished run (accuracies in percent).
- `summary.csv`: the machine-readable numbers behind both comparison tables, one row per
  (setting, row, method, norm): `n_seeds`, `mean`, `std` in percent (sample std, ddof=1).
- `transfer_table.csv/.md`: rows = tasks (`Ar->Cl`, ...) in canonical order + `Avg`; one
  column per method/norm, "mean ± std" over seeds (the mean alone for one seed); a
  `<method> BIN - BN` column (difference of means) per method for every norm run beside the
  baseline norm (`bn` unless the sweep has none), and a footer row `>= BN` counting the tasks
  where that norm's mean is at least the baseline's.
- `multidomain_table.csv/.md`: rows = domains + `Avg`; one column per norm, likewise.
- `comparison.csv/.md`: paired statistics over seeds (`domadapt.stats.all_comparisons`) for
  every norm vs the baseline norm (within each method) and every method vs `source-only`
  (within each norm): per task (row) n paired seeds, mean difference, 95% Student-t interval;
  per comparison (task = `all`) the number of pairs over tasks x seeds and a two-sided
  Wilcoxon signed-rank test (W, p, exact or normal approximation), and (task = `task means`)
  the same over the per-task mean differences with a t interval over tasks. The `>= BN`
  footer of the display tables carries the `task means` test's p and n beside its count.
- `stability.csv/.md`: per task and method/norm, the seed std of the reported accuracy and
  the swing of each run's target accuracy over its evaluations from mid-training on
  (`stability_frame`).
- `trajectory.csv/.md`: per setting, method/norm and evaluated iteration, the mean over runs
  (tasks x seeds) of the target accuracy and of the norm's diagnostics (e.g. `mean_gate`):
  whether accuracy and gates have settled by the last iteration (`trajectory_frame`).
- `gates_by_layer.csv` (when BIN runs wrote gates.csv): the gates per layer, pooled over
  tasks and seeds per setting/method/norm (`gates_frame`); `domadapt compare` draws it.
- `versus.csv/.md` (`write_versus`, `domadapt versus A B`, not part of a sweep's tables): one
  sweep against another, runs paired by task, method, norm and seed; with BIN gate records on
  both sides also `versus_gates.csv` (the paired runs' gates per layer and sweep,
  `versus_gates`), whose network-wide totals are a section of versus.md.
- `selection_table.csv/.md`: for every selection rule the runs recorded
  (`domadapt.selection`), the mean selected target accuracy per setting/method/norm and its
  regret (oracle - rule, percentage points); from log.csv, whatever `select` is.

`Avg` of a column is the mean over rows of each seed's accuracies, then mean ± std over those
seeds; only seeds with every row finished count, so a partial column has no average.

Model selection (`select`): which of a run's logged evaluations (log.csv) the tables report.
`last` (default) reports metrics.json's numbers and writes the file names above. Any other rule
writes `transfer_table_select-<rule>.csv/.md`, `multidomain_table_select-<rule>...`,
`summary_select-<rule>.csv`, `comparison_select-<rule>.csv/.md` and `runs_select-<rule>.csv`
(the evaluation chosen per run) beside them, never over them: the sweep rewrites the `last`
tables after every cell, and the headline tables never silently become target-label-selected.
The Markdown heading names the rule; `oracle` is labelled as using target labels. A multi-domain
run's rule picks on `target_acc` (the domains' mean); its per-domain numbers (`acc_<domain>`)
are that row's. A run without log.csv has no evaluations to choose from: fine for `last`, a
UserError for the other rules (and it is left out of the selection table).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from domadapt.errors import UserError
from domadapt.io import atomic_write_csv, atomic_write_text, read_json
from domadapt.methods import METHODS
from domadapt.norms import NORMS
from domadapt.provenance import code_label
from domadapt.rundir import RECORD, RunDir, sweep_run_dirs
from domadapt.selection import RULES, get_rule, select_runs, selection_table
from domadapt.stats import all_comparisons, paired_comparison

AVG = "Avg"
GATES_BY_LAYER = "gates_by_layer.csv"
BASELINE_NORM = "bn"
RUN_COLUMNS = (
    "dataset", "setting", "task", "source", "target", "method", "norm", "backbone", "seed",
    "iters", "target_acc", "avg_acc", "wall_seconds", "code", "cpu", "cpu_capability", "host",
    "run_key", "run_dir",
)  # + every norm's diagnostics (e.g. mean_gate) found in the runs, before wall_seconds
# What a run's numbers depend on besides its config (config.json, `domadapt.provenance`):
# runs compared with each other should share them (`provenance_note`).
PROVENANCE_FIELDS = {"cpu_capability": "CPU kernel set", "code": "code version", "host": "host"}
ACC_COLUMNS = ("target_acc", "avg_acc")  # fractions in metrics.json, percent in tables
STAT_COLUMNS = ("setting", "row", "method", "norm", "n_seeds", "mean", "std")
BASELINE_METHOD = "source-only"
ALL_PAIRS = "all"  # the `task` of a comparison's overall row over all (task, seed) pairs
OVER_TASKS = "task means"  # ... and of its row over the per-task mean differences
OVERALL_ROWS = {"pairs": ALL_PAIRS, "tasks": OVER_TASKS}  # `stats.paired_comparison` units
COMPARISON_COLUMNS = ("setting", "comparison", "within", "task", "n", "mean_diff", "ci_low",
                      "ci_high", "n_zero", "W", "p_value", "p_method")
SELECTION_COLUMNS = ("rule", "uses_target_labels", "setting", "method", "norm", "target_acc",
                     "regret", "runs")
RULE_TEXT = {  # what each rule's evaluation is, for the tables' notes
    "last": "the last evaluation (metrics.json); no target labels used",
    "source": "the evaluation with the highest accuracy on the held-out source split",
    "entropy": "the evaluation with the lowest mean prediction entropy on the target",
    "snd": "the evaluation with the highest soft neighborhood density on the target",
    "dev": "the evaluation with the lowest deep-embedded-validation (DEV) risk",
    "oracle": ("the evaluation with the highest target accuracy. It USES TARGET LABELS: an "
               "upper bound on model selection, not a method, never the headline"),
}


@dataclass(frozen=True)
class Layout:
    """What the tables show, in order: domains (with short names), task rows, methods, norms."""

    dataset: str
    domains: tuple[str, ...]
    short_names: dict[str, str]
    tasks: tuple[tuple[str, str], ...]
    methods: tuple[str, ...]
    norms: tuple[str, ...]
    multidomain: bool = False

    def task_label(self, source: str, target: str) -> str:
        """`Ar->Cl` for (Art, Clipart)."""
        return f"{self.short_names.get(source, source)}->{self.short_names.get(target, target)}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = [list(t) for t in self.tasks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(
            dataset=d["dataset"], domains=tuple(d["domains"]), short_names=dict(d["short_names"]),
            tasks=tuple((s, t) for s, t in d["tasks"]), methods=tuple(d["methods"]),
            norms=tuple(d["norms"]), multidomain=bool(d.get("multidomain", False)),
        )


def dataset_layout(
    dataset: str,
    root: str | Path | None,
    tasks: Iterable[tuple[str, str]],
    methods: Iterable[str],
    norms: Iterable[str],
    multidomain: bool,
) -> Layout:
    """The Layout of a sweep on `dataset`: tasks sorted into the dataset's canonical order.
    UserError for a task between domains the dataset (at `root`) does not have: runs of two
    datasets (e.g. two folder datasets) mixed in one sweep directory."""
    from domadapt.data import get_dataset

    spec = get_dataset(dataset)
    domains = spec.domain_names(root)
    canonical = {task: i for i, task in enumerate(spec.tasks(root))}
    tasks = set(tasks)
    if foreign := sorted(f"{s}->{t}" for s, t in tasks if (s, t) not in canonical):
        raise UserError(f"{spec.name} at {root} has no task {', '.join(foreign)}")
    return Layout(
        dataset=spec.name,
        domains=tuple(domains),
        short_names={d: spec.short_name(d, root) for d in domains},
        tasks=tuple(sorted(tasks, key=canonical.__getitem__)),
        methods=_ordered(methods, method_order()),
        norms=_ordered(norms, NORMS.names()),
        multidomain=multidomain,
    )


# -- reading run directories ------------------------------------------------------------------

@dataclass(frozen=True)
class FinishedRun:
    """A finished run: its dir, RunConfig fields and run key (config.json), metrics.json."""

    run_dir: Path
    config: dict[str, Any]
    key: str
    metrics: dict[str, Any]
    log: pd.DataFrame | None = None  # log.csv, one row per evaluation; None without one
    provenance: dict[str, Any] = field(default_factory=dict)  # `run_provenance`


def run_provenance(info: dict[str, Any]) -> dict[str, Any]:
    """From a config.json: code (`provenance.code_label`), cpu, cpu_capability and host of the
    run's first start; None where a run made before they were recorded lacks one."""
    runtime = info.get("runtime") or {}
    return {"code": code_label((info.get("provenance") or {}).get("code")),
            **{k: runtime.get(k) for k in ("cpu", "cpu_capability", "host")}}


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


def finished_runs(run_dirs: Iterable[Path]) -> list[FinishedRun]:
    """Every run dir holding metrics.json (train.run's done marker); others are skipped.
    UserError naming the file when config.json or metrics.json lacks what the tables read."""
    found = []
    for run_dir in map(RunDir, run_dirs):
        if not run_dir.is_done():
            continue
        info = run_dir.read_config_dict()
        metrics = run_dir.read_metrics()
        _check_fields(run_dir.config_path, info["config"], _CONFIG_FIELDS)
        if info["config"]["setting"] == "transfer":
            _check_fields(run_dir.config_path, info["config"], {"source": str, "target": str})
        _check_fields(run_dir.metrics_path, metrics, {"target_acc": float})
        if info["config"]["setting"] == "multidomain":
            _check_fields(run_dir.metrics_path, metrics, {"domain_acc": dict})
            _check_fields(run_dir.metrics_path, metrics["domain_acc"],
                          dict.fromkeys(metrics["domain_acc"], float))
        log = run_dir.read_log() if run_dir.log_path.is_file() else None
        found.append(FinishedRun(run_dir.path, info["config"], str(info.get("key", "")),
                                 metrics, log, run_provenance(info)))
    return found


# What the tables read from config.json (under "config") and its type.
_CONFIG_FIELDS = {"dataset": str, "setting": str, "method": str, "norm": str, "seed": int,
                  "backbone": str, "iters": int}


def _check_fields(path: Path, record: dict[str, Any], fields: dict[str, type]) -> None:
    """UserError naming `path` unless `record` has every field with its type (an int counts
    as a float, a bool as neither); `setting` must be transfer or multidomain."""
    for name, kind in fields.items():
        value = record.get(name)
        ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
              ) and not isinstance(value, bool)
        if ok and name == "setting":
            ok = value in ("transfer", "multidomain")
        if not ok:
            found = repr(value) if name in record else "missing"
            raise UserError(f"corrupt {path}: {name!r} is {found}, expected a {kind.__name__}; "
                            f"restore it, or delete {path.parent} and re-run to train it again")


def runs_frame(runs: list[FinishedRun], layout: Layout, sweep_dir: Path) -> pd.DataFrame:
    """One row per finished run (RUN_COLUMNS + diagnostics), accuracies in percent."""
    found = {k for run in runs for k in run.metrics}
    diagnostics = [k for _, kind in NORMS.items() for k in kind.diagnostic_names() if k in found]
    at = RUN_COLUMNS.index("wall_seconds")
    columns = [*RUN_COLUMNS[:at], *dict.fromkeys(diagnostics), *RUN_COLUMNS[at:]]
    rows = []
    for run in runs:
        cfg, transfer = run.config, run.config["setting"] == "transfer"
        row = {k: cfg[k] for k in ("dataset", "setting", "method", "norm", "backbone", "seed",
                                   "iters")}
        row.update(
            task=_task(run, layout),
            source=cfg["source"] if transfer else None,
            target=cfg["target"] if transfer else None,
            run_key=run.key,
            run_dir=relative_path(run.run_dir, sweep_dir),
            **run.provenance,
        )
        row.update({k: run.metrics.get(k) for k in columns if k not in row})
        for k in ACC_COLUMNS:
            row[k] = None if row[k] is None else 100.0 * row[k]
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def scores_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """Long table of accuracies in percent: setting, row, method, norm, seed, acc.

    A transfer run gives one row (its task, target accuracy); a multi-domain run one per
    domain (that domain's test accuracy).
    """
    rows = []
    for run in runs:
        cfg = run.config
        base = {k: cfg[k] for k in ("setting", "method", "norm", "seed")}
        if cfg["setting"] == "transfer":
            rows.append({**base, "row": layout.task_label(cfg["source"], cfg["target"]),
                         "acc": 100.0 * run.metrics["target_acc"]})
        else:
            rows += [{**base, "row": d, "acc": 100.0 * a}
                     for d, a in run.metrics["domain_acc"].items()]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def gates_frame(runs: list[FinishedRun]) -> pd.DataFrame:
    """BIN gates per layer, pooled over the runs that wrote gates.csv (`analysis.gates`): one
    row per setting, method, norm and layer (network order) with n_runs; `mean`: the mean over
    runs of the layer's mean rho; `min`: the lowest rho of any run; `frac_*`: means over runs;
    `hist_*`: channel counts summed over runs. Empty without such runs."""
    from domadapt.analysis.gates import HIGH, HIST_COLUMNS, LOW, RECORD

    parts = [pd.read_csv(run.run_dir / RECORD).assign(
                 **{k: run.config[k] for k in ("setting", "method", "norm")})
             for run in runs if (run.run_dir / RECORD).is_file()]
    if not parts:
        return pd.DataFrame()
    fractions = [f"frac_below_{LOW}", f"frac_above_{HIGH}"]
    return (pd.concat(parts, ignore_index=True)
            .groupby(["setting", "method", "norm", "depth", "layer"], sort=True)
            .agg(n_runs=("mean", "size"), channels=("channels", "first"), mean=("mean", "mean"),
                 min=("min", "min"), **{c: (c, "mean") for c in fractions},
                 **{c: (c, "sum") for c in HIST_COLUMNS})
            .reset_index())


def gate_totals_frame(runs: list[FinishedRun]) -> pd.DataFrame:
    """Per setting, method and norm of the runs with gates.csv: n_runs and the mean over runs
    of each run's network-wide gate totals (`analysis.gates.gate_totals`: mean rho and the
    shares of gates below LOW / above HIGH, every channel weighted equally). Empty without
    such runs."""
    from domadapt.analysis.gates import RECORD, gate_totals

    rows = [{**{k: run.config[k] for k in ("setting", "method", "norm")},
             **gate_totals(pd.read_csv(run.run_dir / RECORD))}
            for run in runs if (run.run_dir / RECORD).is_file()]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).drop(columns=["layers", "channels"])
    values = [c for c in frame.columns if c not in ("setting", "method", "norm")]
    return (frame.groupby(["setting", "method", "norm"], sort=True)
            .agg(n_runs=("mean", "size"), **{c: (c, "mean") for c in values}).reset_index())


SCORE_COLUMNS = ["setting", "row", "method", "norm", "seed", "acc"]
RUN_ID = ["run", "setting", "task", "method", "norm", "seed"]


def evaluations_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """Every logged evaluation of the runs that have a log.csv: the log's columns (a column
    some log lacks is empty, NaN, in its rows) plus RUN_ID (run = the run dir, task = `Ar->Cl`
    or `multidomain`)."""
    parts = []
    for run in runs:
        if run.log is None:
            continue
        cfg, log = run.config, run.log
        meta = {"run": str(run.run_dir), "setting": cfg["setting"],
                "task": (layout.task_label(cfg["source"], cfg["target"])
                         if cfg["setting"] == "transfer" else "multidomain"),
                "method": cfg["method"], "norm": cfg["norm"], "seed": cfg["seed"]}
        parts += [{**meta, **row} for row in
                  log.drop(columns=[c for c in meta if c in log.columns]).to_dict("records")]
    return pd.DataFrame(parts, columns=None if parts else [*RUN_ID, "iter", "target_acc"])


def selected_scores(runs: list[FinishedRun], layout: Layout, select: str
                    ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(scores as `scores_frame` gives them, the evaluation chosen per run) under rule
    `select`. `last` reports metrics.json (no choice table). Another rule needs every run's
    log.csv and its column (else UserError); a multi-domain run's per-domain accuracies are
    the chosen row's `acc_<domain>`."""
    rule = get_rule(select)
    if rule.name == "last":
        return scores_frame(runs, layout), None
    unlogged = [run.run_dir for run in runs if run.log is None]
    if unlogged:
        raise UserError(f"--select {rule.name} needs each run's log.csv, which {len(unlogged)} "
                        f"of {len(runs)} finished runs lack (e.g. {unlogged[0]}); use --select "
                        "last")
    evals = evaluations_frame(runs, layout)
    if evals.empty:
        return scores_frame(runs, layout), evals.assign(selected_by=rule.label)
    evals = evals[~evals["setting"].isin(unrecorded_settings(evals, rule.name))]
    picked = select_runs(evals, rule.name, ["run"])
    by_dir = {str(run.run_dir): run for run in runs}
    rows = []
    for rec in picked.to_dict("records"):
        base = {k: rec[k] for k in ("setting", "method", "norm", "seed")}
        if rec["setting"] == "transfer":
            rows.append({**base, "row": rec["task"], "acc": 100.0 * rec["target_acc"]})
            continue
        for domain in by_dir[rec["run"]].metrics["domain_acc"]:
            acc = rec.get(f"acc_{domain}", math.nan)
            if pd.isna(acc):
                raise UserError(f"{rec['run']}/log.csv: no acc_{domain} in the evaluation at "
                                f"iter {rec['iter']} that --select {rule.name} chose")
            rows.append({**base, "row": domain, "acc": 100.0 * acc})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS), picked


def comparison_frame(scores: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """COMPARISON_COLUMNS, per setting (`stats.all_comparisons` over the accuracies in
    percent, a row = a task or, multi-domain, a domain): for each comparison its per-task rows
    (n paired seeds, mean difference, 95% t interval) in table order, then a row with task
    `all`: n = pairs over tasks x seeds, their mean difference and Wilcoxon signed-rank test,
    and one with task `task means`: n = tasks, the per-task mean differences' mean, 95% t
    interval and Wilcoxon test (`stats.paired_comparison`). Multi-domain adds, after the
    domains, a row `Avg`: per run (seed) its mean over the domains, paired by seed, so the
    independent units are the trained models (the domains of one run share its model)."""
    method = (BASELINE_METHOD if BASELINE_METHOD in layout.methods or not layout.methods
              else layout.methods[0])
    order = {label: i for i, label in enumerate(
        [layout.task_label(s, t) for s, t in layout.tasks] + list(layout.domains) + [AVG])}
    records: list[dict[str, Any]] = []
    for setting, *_ in TABLES:
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


def unrecorded_settings(evals: pd.DataFrame, rule: str) -> set[str]:
    """Settings none of whose runs recorded the column of `rule` while another setting's runs
    did (multi-domain runs have no source hold-out, so no val_source / val_dev): that rule's
    tables leave them out. Empty when no setting recorded it (the rule's check then refuses)."""
    column = get_rule(rule).column
    if column is None or column not in evals.columns:
        return set()
    has = evals[column].notna().groupby(evals["setting"]).any()
    return set(has[~has].index) if has.any() else set()


def selection_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """SELECTION_COLUMNS: `selection.selection_table` over the runs with a log.csv, per
    setting/method/norm, accuracies and regrets in percent (rules some run did not record are
    left out)."""
    evals = evaluations_frame(runs, layout)
    if evals.empty:
        return pd.DataFrame(columns=list(SELECTION_COLUMNS))
    # per setting, so a rule one setting did not record still ranks the other's evaluations
    table = pd.concat([selection_table(part, ["run"], groups=("setting", "method", "norm"))
                       for _, part in evals.groupby("setting", sort=False)], ignore_index=True)
    table[["target_acc", "regret"]] *= 100.0
    return table[list(SELECTION_COLUMNS)].round({"target_acc": 4, "regret": 4})


def stability_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """STABILITY_COLUMNS, in percentage points, per setting, row (task; `multidomain`: the
    domains' mean), method and norm over the runs with a log.csv: `seed_std`, the sample std
    over seeds of the reported (last) accuracy; `swing`, per run the range (max - min) of the
    target accuracy over its evaluations from mid-training on (iter >= iters / 2), as its mean
    and maximum over seeds. A cell whose swing rivals a difference between columns reports
    when training stopped as much as what the method does."""
    rows = []
    for run in runs:
        if run.log is None or "target_acc" not in run.log:
            continue
        cfg = run.config
        late = run.log.loc[run.log["iter"] >= cfg["iters"] / 2, "target_acc"]
        rows.append({
            "setting": cfg["setting"],
            "row": (layout.task_label(cfg["source"], cfg["target"])
                    if cfg["setting"] == "transfer" else "multidomain"),
            "method": cfg["method"], "norm": cfg["norm"], "seed": cfg["seed"],
            "acc": 100.0 * run.metrics["target_acc"],
            "swing": 100.0 * (late.max() - late.min()) if len(late) else float("nan"),
        })
    if not rows:
        return pd.DataFrame(columns=list(STABILITY_COLUMNS))
    out = (pd.DataFrame(rows).groupby(["setting", "row", "method", "norm"], sort=True)
           .agg(n_seeds=("seed", "size"), last_mean=("acc", "mean"), seed_std=("acc", "std"),
                swing_mean=("swing", "mean"), swing_max=("swing", "max"))
           .reset_index().sort_values("setting", ascending=False, kind="stable"))
    return out[list(STABILITY_COLUMNS)].round(
        {"last_mean": 4, "seed_std": 4, "swing_mean": 4, "swing_max": 4})


STABILITY_COLUMNS = ("setting", "row", "method", "norm", "n_seeds", "last_mean", "seed_std",
                     "swing_mean", "swing_max")


def trajectory_frame(runs: list[FinishedRun], layout: Layout) -> pd.DataFrame:
    """Per setting, method, norm and evaluated iteration, over the runs with a log.csv: n_runs,
    the mean over runs (tasks x seeds) of the target accuracy (percent; multi-domain: the
    domains' mean) and of the norm diagnostics the logs have (e.g. mean_gate). Only runs that
    logged that iteration count, so compare iterations on a full grid."""
    evals = evaluations_frame(runs, layout)
    found = [k for _, kind in NORMS.items() for k in kind.diagnostic_names()
             if k in evals.columns]
    if evals.empty:
        return pd.DataFrame(columns=[*TRAJECTORY_KEYS, "n_runs", "target_acc"])
    evals = evals.assign(target_acc=100.0 * evals["target_acc"])
    out = (evals.groupby(list(TRAJECTORY_KEYS), sort=True)
           .agg(n_runs=("run", "size"), target_acc=("target_acc", "mean"),
                **{k: (k, "mean") for k in dict.fromkeys(found)})
           .reset_index().sort_values("setting", ascending=False, kind="stable"))
    return out.round(4)


TRAJECTORY_KEYS = ("setting", "method", "norm", "iter")


# -- aggregation --------------------------------------------------------------------------------

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
        table.insert(table.columns.get_loc(hi) + 1, name, [*map(_signed, delta), ""])
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
    columns = {f"{m}/{n}": (m, n) for m in layout.methods for n in layout.norms}
    rows = [layout.task_label(s, t) for s, t in layout.tasks]
    stats = aggregate(scores, rows, columns)
    base = baseline_norm(layout)
    pairs = {f"{m} {n.upper()} - {base.upper()}": (m, n)
             for m in layout.methods for n in _others(layout, base)}
    diffs = {name: (f"{m}/{n}", f"{m}/{base}") for name, (m, n) in pairs.items()}
    tests = _tests(comparison, {name: (f"norm {n} - {base}", f"method={m}")
                                for name, (m, n) in pairs.items()})
    return stats, display_table(stats, rows, diffs, "task", count_label(layout), tests)


def multidomain_tables(scores: pd.DataFrame, layout: Layout,
                       comparison: pd.DataFrame | None = None
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stats, display) of the multi-domain setting: one column per norm; the count row's
    tests pair domains x seeds."""
    scores = scores[scores["setting"] == "multidomain"]
    if comparison is None:
        comparison = comparison_frame(scores, layout)
    comparison = comparison[comparison["setting"] == "multidomain"]
    rows = list(layout.domains)
    stats = aggregate(scores, rows, {n: (None, n) for n in layout.norms})
    base = baseline_norm(layout)
    diffs = {f"{n.upper()} - {base.upper()}": (n, base) for n in _others(layout, base)}
    tests = _tests(comparison, {name: (f"norm {n} - {base}", "")
                                for name, (n, _) in diffs.items()})
    return stats, display_table(stats, rows, diffs, "domain", count_label(layout), tests)


def baseline_norm(layout: Layout) -> str:
    """The norm every other norm is compared with: bn when the sweep has it."""
    return BASELINE_NORM if BASELINE_NORM in layout.norms else layout.norms[0]


def count_label(layout: Layout) -> str:
    """`BIN >= BN` (`IN / BIN >= BN` with several norms beside the baseline)."""
    base = baseline_norm(layout)
    return f"{' / '.join(n.upper() for n in _others(layout, base))} >= {base.upper()}"


def _others(layout: Layout, base: str) -> list[str]:
    return [n for n in layout.norms if n != base]


# -- writing ------------------------------------------------------------------------------------

TABLES = (  # setting, builder, title, what the numbers are
    ("transfer", transfer_tables, "Transfer", "target accuracy"),
    ("multidomain", multidomain_tables, "Multi-domain", "test accuracy per domain"),
)


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
    layout, runs, record = load_sweep(sweep_dir)
    scores, picked = selected_scores(runs, layout, rule.name)
    comparison = comparison_frame(scores, layout)
    selection = selection_frame(runs, layout)
    sfx = "" if rule.name == "last" else f"_select-{rule.name}"
    command = record.get("command")
    chosen = f"Evaluation reported per run (`--select {rule.name}`): {RULE_TEXT[rule.name]}."
    chosen += " " + provenance_note(_pairing_groups(runs, layout), "(task, seed) groups")
    written = [write_csv_atomic(runs_frame(runs, layout, sweep_dir), out_dir / "runs.csv",
                                index=False)]
    if picked is not None:
        written.append(write_csv_atomic(_picked_frame(picked, rule.column, sweep_dir),
                                        out_dir / f"runs{sfx}.csv", index=False))
    stats = []
    for setting, build, title, what in TABLES:
        if not (layout.tasks if setting == "transfer" else layout.multidomain):
            continue
        if picked is not None and not picked.empty and setting not in set(picked["setting"]):
            chosen += (f" {title} runs did not record {rule.column}: no {setting} tables for "
                       "this rule.")
            continue
        stat, table = build(scores, layout, comparison)
        stats.append(stat.assign(setting=setting))
        base = baseline_norm(layout).upper()
        note = (f"{what.capitalize()} in percent, mean ± std over seeds (sample std; the mean "
                f"alone for one seed). `X - {base}`: difference of means; `{count_label(layout)}`:"
                f" rows where X's mean is at least {base}'s, beside it the two-sided Wilcoxon "
                f"signed-rank p over those n rows' mean paired differences (comparison{sfx}.md, "
                f"`{OVER_TASKS}`; there also the test over all (row, seed) pairs). "
                f"`{AVG}`: over the seeds that finished every row. {chosen}")
        heading = f"{title} accuracy (%) on {layout.dataset}"
        if rule.name != "last":
            heading += f", evaluation selected by {rule.label}"
        written.append(write_csv_atomic(table, out_dir / f"{setting}_table{sfx}.csv"))
        written.append(_write_markdown(table, out_dir / f"{setting}_table{sfx}.md", heading,
                                       note, command))
    summary = (pd.concat(stats, ignore_index=True) if stats
               else pd.DataFrame(columns=list(STAT_COLUMNS)))
    summary = summary[list(STAT_COLUMNS)].round({"mean": 4, "std": 4})
    written.append(write_csv_atomic(summary, out_dir / f"summary{sfx}.csv", index=False))
    written.append(write_csv_atomic(comparison, out_dir / f"comparison{sfx}.csv", index=False))
    written.append(write_markdown_parts(
        out_dir / f"comparison{sfx}.md",
        f"Paired comparisons on {layout.dataset}, evaluation selected by {rule.label}",
        COMPARISON_NOTE + " " + chosen, comparison_sections(comparison), command))
    written.append(write_csv_atomic(selection, out_dir / "selection_table.csv", index=False))
    stability = stability_frame(runs, layout)
    written.append(write_csv_atomic(stability, out_dir / "stability.csv", index=False))
    written.append(_write_markdown(
        stability.set_index("setting").round(1), out_dir / "stability.md",
        f"Stability of the reported numbers on {layout.dataset}", STABILITY_NOTE, command))
    trajectory = trajectory_frame(runs, layout)
    written.append(write_csv_atomic(trajectory, out_dir / "trajectory.csv", index=False))
    written.append(_write_markdown(
        trajectory.set_index("setting").round({"target_acc": 1}),
        out_dir / "trajectory.md", f"Accuracy and norm diagnostics over training on "
        f"{layout.dataset}", TRAJECTORY_NOTE, command))
    if not (gates := gates_frame(runs)).empty:
        written.append(write_csv_atomic(gates.round(6), out_dir / GATES_BY_LAYER, index=False))
    written.append(write_markdown_parts(
        out_dir / "selection_table.md", f"Model selection on {layout.dataset}",
        _selection_note(runs, selection), _selection_sections(selection, layout), command))
    return written


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


def load_sweep(sweep_dir: Path) -> tuple[Layout, list[FinishedRun], dict[str, Any]]:
    """(layout, finished runs, sweep.json) of a sweep directory: the Layout and run list from
    sweep.json when present, else every run dir under `sweep_dir/runs`, laid out from what
    finished. UserError for a missing directory, a corrupt record, runs differing beyond
    their cell."""
    if not sweep_dir.is_dir():
        raise UserError(f"sweep directory not found: {sweep_dir}")
    record = _read(sweep_dir / RECORD) if (sweep_dir / RECORD).is_file() else {}
    try:
        layout = Layout.from_dict(record["layout"]) if record else None
        run_dirs = ([sweep_dir / r for r in record["runs"]] if record
                    else sweep_run_dirs(sweep_dir))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"corrupt sweep record ({e!r} missing or malformed): "
                        f"{sweep_dir / RECORD}") from None
    runs = finished_runs(run_dirs)
    _check_unique(runs)
    if layout is None:
        if not runs:
            raise UserError(f"no finished runs and no {RECORD} in {sweep_dir}")
        layout = _layout_from_runs([run.config for run in runs])
    return replace(layout, methods=_ordered(layout.methods, method_order())), runs, record


def method_order() -> tuple[str, ...]:
    """Column order of methods: the baseline (source-only) first, then the registry's."""
    return (BASELINE_METHOD, *(m for m in METHODS.names() if m != BASELINE_METHOD))


# -- one sweep against another ------------------------------------------------------------------

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


def _pairing_groups(runs: list[FinishedRun], layout: Layout) -> dict[str, list[FinishedRun]]:
    """The runs a sweep's comparisons pair with each other: one group per setting, task and
    seed (BIN - BN pairs within a method, DANN - source-only within a norm)."""
    groups: dict[str, list[FinishedRun]] = {}
    for run in runs:
        groups.setdefault(f"{_task(run, layout)} s{run.config['seed']}", []).append(run)
    return groups


def _task(run: FinishedRun, layout: Layout) -> str:
    """A run's row label: its task (e.g. A->C) or `multidomain`."""
    cfg = run.config
    return (layout.task_label(cfg["source"], cfg["target"]) if cfg["setting"] == "transfer"
            else "multidomain")


def _run_label(run: FinishedRun, layout: Layout) -> str:
    cfg = run.config
    return f"{_task(run, layout)} {cfg['method']}/{cfg['norm']} s{cfg['seed']}"


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
    from domadapt.analysis.gates import RECORD

    def with_gates(runs: list[FinishedRun]) -> set[tuple[Any, ...]]:
        return {_cell_key(r) for r in runs if (r.run_dir / RECORD).is_file()}

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
    (la, ra, _), (lb, rb, _) = load_sweep(Path(a_dir)), load_sweep(Path(b_dir))
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
        "B - A": [_signed(v, 2) for v in table["mean_diff"]],
        "95% CI (t)": [_interval(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"],
                                                           strict=True)],
        "Wilcoxon signed-rank": [_wilcoxon(r) if r["row"] in OVERALL_ROWS.values() else ""
                                 for r in table.to_dict("records")],
    }).set_index("method/norm")
    note = (f"A = `{a_dir}`, B = `{b_dir}`; they differ in {what}. Runs are paired by task "
            "(multi-domain: domain), method, norm and seed; accuracies in percent at the "
            f"evaluation `--select {rule.name}` picks ({RULE_TEXT[rule.name]}). Per task: n "
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
    from domadapt.analysis.gates import HIGH, LOW

    return pd.DataFrame({
        "sweep": totals["sweep"],
        "method/norm": [f"{r['setting']} {r['method']}/{r['norm']}"
                        for r in totals.to_dict("records")],
        "runs": totals["n_runs"].astype(int),
        "mean rho": totals["mean"].map("{:.3f}".format),
        f"% rho < {LOW}": (100 * totals[f"frac_below_{LOW}"]).map("{:.2f}".format),
        f"% rho > {HIGH}": (100 * totals[f"frac_above_{HIGH}"]).map("{:.2f}".format),
    }).set_index("sweep")


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
            "mean diff": [_signed(v, 2) for v in part["mean_diff"]],
            "95% CI (t)": [_interval(lo, hi) for lo, hi in zip(part["ci_low"], part["ci_high"],
                                                               strict=True)],
            "Wilcoxon signed-rank": [_wilcoxon(r) if r["task"] in OVERALL_ROWS.values() else ""
                                     for r in part.to_dict("records")],
        }, index=pd.Index([f"{c} ({w})" for c, w in zip(part["comparison"], part["within"],
                                                        strict=True)], name="comparison"))
        sections.append((title, table))
    return sections


def _selection_note(runs: list[FinishedRun], selection: pd.DataFrame) -> str:
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


def _selection_sections(selection: pd.DataFrame, layout: Layout
                        ) -> list[tuple[str, pd.DataFrame]]:
    """Rows = rules (RULES order), columns = method/norm (multi-domain: the norm)."""
    sections = []
    for setting, _, title, _ in TABLES:
        part = selection[selection["setting"] == setting]
        if part.empty:
            continue
        rules = [RULES[n].label for n in RULES if RULES[n].label in set(part["rule"])]
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


# -- helpers ------------------------------------------------------------------------------------

def _layout_from_runs(configs: list[dict[str, Any]]) -> Layout:
    """A Layout from finished runs alone; full domain names if the dataset can't be read."""
    datasets = {c["dataset"] for c in configs}
    if len(datasets) > 1:
        raise UserError("runs of several datasets in one sweep directory: "
                        f"{', '.join(sorted(datasets))}")
    transfer = [c for c in configs if c["setting"] == "transfer"]
    tasks = {(c["source"], c["target"]) for c in transfer}
    methods = {c["method"] for c in transfer}
    norms = {c["norm"] for c in configs}
    multidomain = len(transfer) < len(configs)
    try:
        return dataset_layout(configs[0]["dataset"], configs[0].get("root"), tasks, methods,
                              norms, multidomain)
    except UserError:  # a folder dataset whose root is gone, runs of two folder datasets
        domains = sorted({d for t in tasks for d in t})
        return Layout(configs[0]["dataset"], tuple(domains), {d: d for d in domains},
                      tuple(sorted(tasks)), _ordered(methods, method_order()), _ordered(norms, NORMS.names()),
                      multidomain)


def _check_unique(runs: list[FinishedRun]) -> None:
    """Refuse to average runs that differ in more than the seed (e.g. two --iters values)."""
    groups: dict[tuple, list[FinishedRun]] = {}
    for run in runs:
        ident = tuple(run.config.get(k)
                      for k in ("setting", "source", "target", "method", "norm", "seed"))
        groups.setdefault(ident, []).append(run)
    for clash in (g for g in groups.values() if len(g) > 1):
        configs = [r.config for r in clash]
        differ = sorted(k for k in configs[0] if len({repr(c.get(k)) for c in configs}) > 1)
        raise UserError(
            f"{len(clash)} runs of the same cell differ in {', '.join(differ) or 'nothing'}: "
            f"{', '.join(str(r.run_dir) for r in clash)}; keep each setting in its own sweep "
            "directory"
        )


def write_csv_atomic(frame: pd.DataFrame, path: Path, index: bool = True) -> Path:
    atomic_write_csv(path, frame, index=index)
    return path


def _write_markdown(table: pd.DataFrame, path: Path, heading: str, note: str,
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


def _read(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise UserError(f"missing {path.name}: {path}") from None
    except ValueError as e:
        raise UserError(f"corrupt JSON in {path}: {e}") from None


def _ordered(values: Iterable[str], canonical: tuple[str, ...]) -> tuple[str, ...]:
    values = set(values)
    return tuple(v for v in canonical if v in values) + tuple(sorted(values - set(canonical)))


def relative_path(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.1f}" if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def _signed(value: float, digits: int = 1) -> str:
    return "" if pd.isna(value) else f"{value:+.{digits}f}"


def _interval(low: float, high: float) -> str:
    return "" if pd.isna(low) else f"[{low:+.2f}, {high:+.2f}]"


def _p(p: float) -> str:
    """A p-value for a table cell: `p=` and 2 decimals from 0.1, else 2 significant digits
    (0.049 and 0.051 stay apart); `p<0.001`; `p=n/a` when untested."""
    if pd.isna(p):
        return "p=n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}" if p < 0.1 else f"p={p:.2f}"


def _wilcoxon(row: dict[str, Any]) -> str:
    if pd.isna(row["p_value"]):
        return f"no test ({int(row['n_zero'])} zero differences)" if row["n"] else ""
    zeros = f", {int(row['n_zero'])} zero dropped" if row["n_zero"] else ""
    return f"{_p(row['p_value'])} ({row['p_method']}), W={row['W']:g}{zeros}"


def _cell(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
