"""Run records: the finished run directories of a sweep and its layout (sweep.json), checked."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from domadapt.config import SETTINGS
from domadapt.errors import UserError
from domadapt.io import read_json
from domadapt.methods import METHODS
from domadapt.norms import NORMS
from domadapt.provenance import code_label
from domadapt.rundir import RECORD, RunDir, sweep_run_dirs

BASELINE_METHOD = "source-only"


@dataclass(frozen=True)
class Layout:
    """What the tables show, in order: domains (with short names), task rows, methods, norms;
    whether the sweep has multi-domain cells and leave-one-domain-out (dg) cells."""

    dataset: str
    domains: tuple[str, ...]
    short_names: dict[str, str]
    tasks: tuple[tuple[str, str], ...]
    methods: tuple[str, ...]
    norms: tuple[str, ...]
    multidomain: bool = False
    dg: bool = False
    # (setting, method, norm) columns the protocol refuses (`settings.check_protocol`): the
    # sweep never runs them, so the tables leave them out instead of showing empty columns
    left_out: tuple[tuple[str, str, str], ...] = ()

    def shows(self, setting: str, method: str, norm: str) -> bool:
        """Whether a table of `setting` has the column of `method` x `norm`."""
        return (setting, method, norm) not in self.left_out

    def norms_shown(self, setting: str) -> list[str]:
        """The norms with a column in the tables of `setting` (multi-domain and dg cells are
        source-only)."""
        methods = self.methods if setting == "transfer" else (BASELINE_METHOD,)
        return [n for n in self.norms if any(self.shows(setting, m, n) for m in methods)]

    def has(self, setting: str) -> bool:
        """Whether the sweep has cells of `setting` (its tables are written, maybe empty)."""
        return {"transfer": bool(self.tasks), "multidomain": self.multidomain,
                "dg": self.dg}[setting]

    def task_label(self, source: str, target: str) -> str:
        """`Ar->Cl` for (Art, Clipart)."""
        return f"{self.short_names.get(source, source)}->{self.short_names.get(target, target)}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = [list(t) for t in self.tasks]
        d["left_out"] = [list(c) for c in self.left_out]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(
            dataset=d["dataset"], domains=tuple(d["domains"]), short_names=dict(d["short_names"]),
            tasks=tuple((s, t) for s, t in d["tasks"]), methods=tuple(d["methods"]),
            norms=tuple(d["norms"]), multidomain=bool(d.get("multidomain", False)),
            dg=bool(d.get("dg", False)),
            left_out=tuple(tuple(c) for c in d.get("left_out", ())),
        )


def dataset_layout(
    dataset: str,
    root: str | Path | None,
    tasks: Iterable[tuple[str, str]],
    methods: Iterable[str],
    norms: Iterable[str],
    multidomain: bool,
    dg: bool = False,
    left_out: Iterable[tuple[str, str, str]] = (),
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
        methods=ordered(methods, method_order()),
        norms=ordered(norms, NORMS.names()),
        multidomain=multidomain,
        dg=dg,
        left_out=tuple(sorted(left_out)),
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
        setting = info["config"]["setting"]
        if setting != "multidomain":  # transfer: its task; dg: the domain held out
            _check_fields(run_dir.config_path, info["config"],
                          {"source": str, "target": str} if setting == "transfer"
                          else {"target": str})
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
    as a float, a bool as neither); `setting` must be one of `config.SETTINGS`."""
    for name, kind in fields.items():
        value = record.get(name)
        ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
              ) and not isinstance(value, bool)
        if ok and name == "setting":
            ok = value in SETTINGS
        if not ok:
            found = repr(value) if name in record else "missing"
            raise UserError(f"corrupt {path}: {name!r} is {found}, expected a {kind.__name__}; "
                            f"restore it, or delete {path.parent} and re-run to train it again")


def load_sweep(sweep_dir: Path, *, trials: bool = False
               ) -> tuple[Layout, list[FinishedRun], dict[str, Any]]:
    """(layout, finished runs, sweep.json) of a sweep directory: the Layout and run list from
    sweep.json when present, else every run dir under `sweep_dir/runs`, laid out from what
    finished. UserError for a missing directory, a corrupt record, runs differing beyond
    their cell (and trial). Of a hyper-parameter search only trial 0 (the defaults: one run
    per cell) unless `trials` (then every trial: `domadapt.tables.trials` chooses)."""
    if not sweep_dir.is_dir():
        raise UserError(f"sweep directory not found: {sweep_dir}")
    record = read_record(sweep_dir / RECORD) if (sweep_dir / RECORD).is_file() else {}
    try:
        layout = Layout.from_dict(record["layout"]) if record else None
        run_dirs = ([sweep_dir / r for r in record["runs"]] if record
                    else sweep_run_dirs(sweep_dir))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"corrupt sweep record ({e!r} missing or malformed): "
                        f"{sweep_dir / RECORD}") from None
    runs = finished_runs(run_dirs)
    _check_unique(runs)
    if not trials:
        runs = [run for run in runs if not run.config.get("hparams_trial")]
    if layout is None:
        if not runs:
            raise UserError(f"no finished runs and no {RECORD} in {sweep_dir}")
        layout = _layout_from_runs([run.config for run in runs])
    return replace(layout, methods=ordered(layout.methods, method_order())), runs, record


def method_order() -> tuple[str, ...]:
    """Column order of methods: the baseline (source-only) first, then the registry's."""
    return (BASELINE_METHOD, *(m for m in METHODS.names() if m != BASELINE_METHOD))


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
    settings = {c["setting"] for c in configs}
    multidomain, dg = "multidomain" in settings, "dg" in settings
    try:
        return dataset_layout(configs[0]["dataset"], configs[0].get("root"), tasks, methods,
                              norms, multidomain, dg=dg)
    except UserError:  # a folder dataset whose root is gone, runs of two folder datasets
        domains = sorted({d for t in tasks for d in t}
                         | {c["target"] for c in configs if c["setting"] == "dg"})
        return Layout(configs[0]["dataset"], tuple(domains), {d: d for d in domains},
                      tuple(sorted(tasks)), ordered(methods, method_order()),
                      ordered(norms, NORMS.names()), multidomain, dg)


def _check_unique(runs: list[FinishedRun]) -> None:
    """Refuse to average runs that differ in more than the seed (e.g. two --iters values);
    the trials of a hyper-parameter search (`hparams_trial`) are distinct runs of one cell."""
    groups: dict[tuple, list[FinishedRun]] = {}
    for run in runs:
        ident = tuple(run.config.get(k) for k in ("setting", "source", "target", "method",
                                                  "norm", "seed", "hparams_trial"))
        groups.setdefault(ident, []).append(run)
    for clash in (g for g in groups.values() if len(g) > 1):
        configs = [r.config for r in clash]
        differ = sorted(k for k in configs[0] if len({repr(c.get(k)) for c in configs}) > 1)
        raise UserError(
            f"{len(clash)} runs of the same cell differ in {', '.join(differ) or 'nothing'}: "
            f"{', '.join(str(r.run_dir) for r in clash)}; keep each setting in its own sweep "
            "directory"
        )


def read_record(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise UserError(f"missing {path.name}: {path}") from None
    except ValueError as e:
        raise UserError(f"corrupt JSON in {path}: {e}") from None


def ordered(values: Iterable[str], canonical: tuple[str, ...]) -> tuple[str, ...]:
    values = set(values)
    return tuple(v for v in canonical if v in values) + tuple(sorted(values - set(canonical)))


def relative_path(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def run_task(run: FinishedRun, layout: Layout) -> str:
    """A run's row label (`config_task`)."""
    return config_task(run.config, layout)


def config_task(cfg: dict[str, Any], layout: Layout) -> str:
    """The row label of a run's config (config.json's fields): its task (e.g. A->C),
    `multidomain`, or (dg) the domain it held out."""
    if cfg["setting"] == "transfer":
        return layout.task_label(cfg["source"], cfg["target"])
    return cfg["target"] if cfg["setting"] == "dg" else "multidomain"