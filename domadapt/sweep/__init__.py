"""Sweeps: a grid of RunConfigs, one run directory per cell, run by a launcher.

On disk (DomainBed-style)::

    SWEEP_DIR/sweep.json                       the command, grid, options and table Layout
    SWEEP_DIR/runs/<cfg.name()>-<cfg.key()>/   one run dir per cell (train.run's files)
        metrics.json                           written last by train.run: the done marker
        .lock                                  flock held by the process running the cell
        error.txt                              traceback of the cell's last failure
    SWEEP_DIR/submitit/                        job logs of the submitit launcher

Re-running a sweep skips finished cells and resumes unfinished ones (train.run continues from
the run dir's checkpoint). Only the process holding a cell's lock runs it, so sweeps sharing a
directory never run a cell twice: a cell busy elsewhere is skipped, and once the rest is
through, waited for and run if it was left unfinished. Tables are rebuilt after every cell.
Each invocation rewrites sweep.json with its own grid (the tables show that grid). Slurm jobs
keep running when the sweep command itself is interrupted; a re-run collects them.

Modules: `grid` (parsing the lists, `plan_sweep`), `launchers/` (the `LAUNCHERS` registry and
the cell outcome a launcher yields in `base`, one module per launcher), `loop` (`run_cell`,
`run_sweep`). The names other code uses are re-exported here, lazily (PEP 562), so reading the
`LAUNCHERS` registry (the CLI's --launcher help) does not import the tables.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "grid": ("SweepPlan", "build_grid", "parse_seeds", "plan_sweep", "split_list"),
    "launchers": ("BUSY", "FAILED", "FINISHED", "LAUNCHERS", "RAN", "CellResult", "Launcher",
                  "LocalLauncher", "ProcessLauncher", "SubmititLauncher", "make_launcher",
                  "register_launcher"),
    "loop": ("SweepReport", "run_cell", "run_sweep"),
}
_MODULE = {name: module for module, names in _HOME.items() for name in names}
__all__ = [
    "BUSY", "FAILED", "FINISHED", "LAUNCHERS", "RAN", "CellResult", "Launcher", "LocalLauncher",
    "ProcessLauncher", "SubmititLauncher", "SweepPlan", "SweepReport", "build_grid",
    "make_launcher", "parse_seeds", "plan_sweep", "register_launcher", "run_cell", "run_sweep",
    "split_list",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE[name]}"), name)
