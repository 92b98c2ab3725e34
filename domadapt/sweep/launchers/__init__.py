"""Launchers: how a sweep's cells run, looked up by name in `LAUNCHERS`. One module per
launcher, each registering its builder when imported (every module of this package is):
`local` (this process or worker processes), `slurm` (`submitit`: one Slurm job per cell). A new
launcher is one new file here; `base` holds the contract."""

from domadapt.registry import import_submodules
from domadapt.sweep.launchers.base import (
    BUSY,
    FAILED,
    FINISHED,
    LAUNCHERS,
    RAN,
    Cell,
    CellFn,
    CellResult,
    Launcher,
    LauncherBuilder,
    make_launcher,
    register_launcher,
)

import_submodules(__name__, __path__)

from domadapt.sweep.launchers.local import LocalLauncher, ProcessLauncher
from domadapt.sweep.launchers.slurm import SubmititLauncher

__all__ = [
    "BUSY", "FAILED", "FINISHED", "LAUNCHERS", "RAN", "Cell", "CellFn", "CellResult", "Launcher",
    "LauncherBuilder", "LocalLauncher", "ProcessLauncher", "SubmititLauncher", "make_launcher",
    "register_launcher",
]
