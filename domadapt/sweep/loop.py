"""The run loop: one cell under its lock (`run_cell`), and a whole sweep through a launcher
(`run_sweep`), rebuilding the tables as cells finish."""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from domadapt.config import RunConfig
from domadapt.data.registry import check_outside_root
from domadapt.errors import UserError
from domadapt.io import atomic_write_json, atomic_write_text
from domadapt.progress import progress
from domadapt.provenance import portable_path
from domadapt.rundir import ERROR, METRICS, RECORD, RUNS_DIR, RunDir, cell_dir, run_lock
from domadapt.sweep.grid import SweepPlan
from domadapt.sweep.launchers import (
    BUSY,
    FAILED,
    FINISHED,
    RAN,
    CellResult,
    Launcher,
    LocalLauncher,
)
from domadapt.tables import write_tables

Runner = Callable[..., dict]  # train.run(cfg, run_dir, *, device, quiet) -> metrics


@dataclass
class SweepReport:
    total: int
    skipped: int = 0  # finished before this sweep started
    ran: int = 0
    finished_elsewhere: int = 0
    failed: list[CellResult] = field(default_factory=list)


def is_done(run_dir: Path) -> bool:
    return RunDir(run_dir).is_done()


# -- one cell -----------------------------------------------------------------------------------

def run_cell(cfg: RunConfig, run_dir: Path, *, runner: Runner | None = None,
             device: str = "auto", quiet: bool = True) -> CellResult:
    """Run one cell under its lock unless it is busy or finished; never raises for a failed
    run (its traceback goes to `run_dir/error.txt`). `runner` defaults to train.run."""
    if runner is None:
        from domadapt.train import run as runner
    with run_lock(run_dir) as mine:
        if not mine:
            return CellResult(run_dir, BUSY)
        if is_done(run_dir):
            return CellResult(run_dir, FINISHED)
        try:
            runner(cfg, run_dir, device=device, quiet=quiet)
        except Exception as e:  # noqa: BLE001 -- one bad cell must not end the sweep
            atomic_write_text(run_dir / ERROR, traceback.format_exc())
            why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            return CellResult(run_dir, FAILED, why)
        (run_dir / ERROR).unlink(missing_ok=True)
        if not is_done(run_dir):
            return CellResult(run_dir, FAILED, f"the run returned without writing {METRICS}")
        return CellResult(run_dir, RAN)


def run_sweep(
    plan: SweepPlan,
    sweep_dir: str | Path,
    launcher: Launcher,
    *,
    results_dir: str | Path | None = None,
    runner: Runner | None = None,
    device: str = "auto",
    quiet: bool = False,
    tables_interval: float = 10.0,
) -> SweepReport:
    """Write sweep.json, run every unfinished cell, rebuild the tables as cells finish.

    The tables are rebuilt after a finished cell when the last rebuild is at least
    `tables_interval` seconds old (a rebuild reads every run, so rebuilding after each of many
    short cells costs O(cells^2)), and always when the sweep ends or is interrupted.
    `runner` (default train.run) must be picklable for process and submitit launchers.
    """
    sweep_dir = Path(sweep_dir).absolute()  # jobs and workers may run elsewhere
    results_dir = Path(results_dir).absolute() if results_dir is not None else sweep_dir
    cells = [(cfg, cell_dir(sweep_dir, cfg)) for cfg in plan.configs]
    if root := plan.record.get("root"):
        check_outside_root(sweep_dir, root)
        check_outside_root(results_dir, root, "--results")
    _make_dirs(sweep_dir / RUNS_DIR, results_dir)
    record = {**plan.record, **({"root": portable_path(root)} if root else {})}
    atomic_write_json(sweep_dir / RECORD, {
        **record, "results": os.path.relpath(results_dir, sweep_dir), "layout": plan.layout.to_dict(),
        "runs": [str(d.relative_to(sweep_dir)) for _, d in cells],
    })
    in_process = isinstance(launcher, LocalLauncher)
    fn = partial(run_cell, runner=runner, device=device, quiet=quiet or not in_process)

    todo = [(cfg, d) for cfg, d in cells if not is_done(d)]
    report = SweepReport(total=len(cells), skipped=len(cells) - len(todo))
    last_tables = -math.inf
    with progress(total=len(cells), initial=report.skipped, quiet=quiet, desc="sweep",
                  unit="cell") as bar, _tables_on_exit(sweep_dir, results_dir):
        while todo:
            busy = []
            with closing(launcher.launch(fn, todo)) as results:  # stops workers on errors
                for result in results:
                    if result.status == BUSY:
                        busy.append(result.run_dir)
                        continue
                    if result.status == FAILED:
                        report.failed.append(result)
                        bar.set_postfix(failed=len(report.failed))
                        continue
                    report.ran += result.status == RAN
                    report.finished_elsewhere += result.status == FINISHED
                    bar.update()
                    if time.monotonic() - last_tables >= tables_interval:
                        write_tables(sweep_dir, results_dir)
                        last_tables = time.monotonic()
            todo = []
            for cfg, run_dir in cells:  # cells another sweep holds: wait, take over leftovers
                if run_dir not in busy:
                    continue
                bar.set_description("sweep (waiting for another sweep)")
                with run_lock(run_dir, wait=True):
                    pass
                if is_done(run_dir):
                    report.finished_elsewhere += 1
                    bar.update()
                else:
                    todo.append((cfg, run_dir))
    return report


@contextmanager
def _tables_on_exit(sweep_dir: Path, results_dir: Path) -> Iterator[None]:
    """Rebuild the tables when the block ends, also when it is interrupted (Ctrl-C, SIGTERM,
    a failed launcher), so they show every finished cell; an error while rebuilding them
    after another error does not hide that one."""
    try:
        yield
    except BaseException:
        with suppress(Exception):
            write_tables(sweep_dir, results_dir)
        raise
    write_tables(sweep_dir, results_dir)


def _make_dirs(*dirs: Path) -> None:
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not os.access(d, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise UserError(f"cannot write to {d}: {e.strerror or e}") from None
