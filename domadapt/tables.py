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

`Avg` of a column is the mean over rows of each seed's accuracies, then mean ± std over those
seeds; only seeds with every row finished count, so a partial column has no average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from domadapt.errors import UserError
from domadapt.io import atomic_path, atomic_write_text, read_json
from domadapt.methods import METHODS
from domadapt.norms import NORMS
from domadapt.rundir import RECORD, RunDir, sweep_run_dirs

AVG = "Avg"
BASELINE_NORM = "bn"
RUN_COLUMNS = (
    "dataset", "setting", "task", "source", "target", "method", "norm", "backbone", "seed",
    "iters", "target_acc", "avg_acc", "wall_seconds", "run_key", "run_dir",
)  # + every norm's diagnostics (e.g. mean_gate) found in the runs, before wall_seconds
ACC_COLUMNS = ("target_acc", "avg_acc")  # fractions in metrics.json, percent in tables
STAT_COLUMNS = ("setting", "row", "method", "norm", "n_seeds", "mean", "std")


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
    """The Layout of a sweep on `dataset`: tasks sorted into the dataset's canonical order."""
    from domadapt.data import get_dataset

    spec = get_dataset(dataset)
    domains = spec.domain_names(root)
    canonical = {task: i for i, task in enumerate(spec.tasks(root))}
    return Layout(
        dataset=spec.name,
        domains=tuple(domains),
        short_names={d: spec.short_name(d, root) for d in domains},
        tasks=tuple(sorted(set(tasks), key=canonical.__getitem__)),
        methods=_ordered(methods, METHODS.names()),
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


def finished_runs(run_dirs: Iterable[Path]) -> list[FinishedRun]:
    """Every run dir holding metrics.json (train.run's done marker); others are skipped."""
    found = []
    for run_dir in map(RunDir, run_dirs):
        if not run_dir.is_done():
            continue
        info = run_dir.read_config_dict()
        found.append(FinishedRun(run_dir.path, info["config"], str(info.get("key", "")),
                                 run_dir.read_metrics()))
    return found


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
            task=layout.task_label(cfg["source"], cfg["target"]) if transfer else "multidomain",
            source=cfg["source"] if transfer else None,
            target=cfg["target"] if transfer else None,
            run_key=run.key,
            run_dir=_relative(run.run_dir, sweep_dir),
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
    return pd.DataFrame(rows, columns=["setting", "row", "method", "norm", "seed", "acc"])


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
                  index_name: str, count_row: str) -> pd.DataFrame:
    """Formatted table: "mean ± std" per column, then each diff column `name: (norm, baseline)`
    placed after its norm's column, and a `count_row` footer (e.g. `BIN >= BN`) counting the
    rows (not Avg) where the norm's mean is at least the baseline's."""
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
        table.at[count_row, name] = f"{int((both >= 0).sum())}/{len(both)}"
    return table


def transfer_tables(scores: pd.DataFrame, layout: Layout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stats, display) of the transfer setting: one column per method/norm."""
    scores = scores[scores["setting"] == "transfer"]
    columns = {f"{m}/{n}": (m, n) for m in layout.methods for n in layout.norms}
    rows = [layout.task_label(s, t) for s, t in layout.tasks]
    stats = aggregate(scores, rows, columns)
    base = baseline_norm(layout)
    diffs = {f"{m} {n.upper()} - {base.upper()}": (f"{m}/{n}", f"{m}/{base}")
             for m in layout.methods for n in _others(layout, base)}
    return stats, display_table(stats, rows, diffs, "task", count_label(layout))


def multidomain_tables(scores: pd.DataFrame, layout: Layout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stats, display) of the multi-domain setting: one column per norm."""
    scores = scores[scores["setting"] == "multidomain"]
    rows = list(layout.domains)
    stats = aggregate(scores, rows, {n: (None, n) for n in layout.norms})
    base = baseline_norm(layout)
    diffs = {f"{n.upper()} - {base.upper()}": (n, base) for n in _others(layout, base)}
    return stats, display_table(stats, rows, diffs, "domain", count_label(layout))


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


def write_tables(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Rebuild every table of the sweep in `sweep_dir` into `out_dir` (default: `sweep_dir`).

    Takes the Layout and the run list from `sweep.json` when present; otherwise every run dir
    under `sweep_dir/runs`, laid out from what finished. Returns the paths written.
    """
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
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

    written = [_write_csv(runs_frame(runs, layout, sweep_dir), out_dir / "runs.csv", index=False)]
    scores = scores_frame(runs, layout)
    stats = []
    for setting, build, title, what in TABLES:
        if not (layout.tasks if setting == "transfer" else layout.multidomain):
            continue
        stat, table = build(scores, layout)
        stats.append(stat.assign(setting=setting))
        base = baseline_norm(layout).upper()
        note = (f"{what.capitalize()} in percent, mean ± std over seeds (sample std; the mean "
                f"alone for one seed). `X - {base}`: difference of means; `{count_label(layout)}`:"
                f" rows where X's mean is at least {base}'s. `{AVG}`: over the seeds that "
                "finished every row.")
        heading = f"{title} accuracy (%) on {layout.dataset}"
        written.append(_write_csv(table, out_dir / f"{setting}_table.csv"))
        written.append(_write_markdown(table, out_dir / f"{setting}_table.md", heading, note,
                                       record.get("command")))
    summary = (pd.concat(stats, ignore_index=True) if stats
               else pd.DataFrame(columns=list(STAT_COLUMNS)))
    summary = summary[list(STAT_COLUMNS)].round({"mean": 4, "std": 4})
    written.append(_write_csv(summary, out_dir / "summary.csv", index=False))
    return written


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
    except UserError:  # e.g. a folder dataset whose root is gone
        domains = sorted({d for t in tasks for d in t})
        return Layout(configs[0]["dataset"], tuple(domains), {d: d for d in domains},
                      tuple(sorted(tasks)), _ordered(methods, METHODS.names()), _ordered(norms, NORMS.names()),
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


def _write_csv(frame: pd.DataFrame, path: Path, index: bool = True) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
    return path


def _write_markdown(table: pd.DataFrame, path: Path, heading: str, note: str,
                    command: str | None) -> Path:
    parts = [f"# {heading}\n", note + "\n", markdown_table(table)]
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


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.1f}" if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def _signed(value: float) -> str:
    return "" if pd.isna(value) else f"{value:+.1f}"


def _cell(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
