"""The launcher contract: the cell outcome a launcher yields (`CellResult`), the `Launcher`
protocol, and the `LAUNCHERS` registry of builders (`register_launcher`, `make_launcher`)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from domadapt.config import RunConfig
from domadapt.registry import Registry

# Cell outcomes.
RAN, FINISHED, BUSY, FAILED = "ran", "finished", "busy", "failed"

Cell = tuple[RunConfig, Path]  # a config and its run dir


@dataclass(frozen=True)
class CellResult:
    """What happened to one cell: RAN (here), FINISHED (by someone else), BUSY or FAILED."""

    run_dir: Path
    status: str
    error: str | None = None


CellFn = Callable[[RunConfig, Path], CellResult]


class Launcher(Protocol):
    def launch(self, fn: CellFn, cells: Sequence[Cell]) -> Generator[CellResult, None, None]:
        """Run `fn` on every cell; yield the results as cells complete."""


class LauncherBuilder(Protocol):
    def __call__(self, *, workers: int | None, device: str, sweep_dir: Path,
                 slurm: dict[str, Any] | None) -> Launcher:
        """A Launcher for the sweep in `sweep_dir`; UserError for options it cannot use."""


# name -> builder; a plug-in launcher registers here (`register_launcher`), the CLI's
# --launcher choices, help and completion read it.
LAUNCHERS: Registry[LauncherBuilder] = Registry("launcher")


def register_launcher(name: str) -> Callable[[LauncherBuilder], LauncherBuilder]:
    """Decorator: register a launcher builder under `name` (twice: ValueError)."""

    def add(builder: LauncherBuilder) -> LauncherBuilder:
        return LAUNCHERS.register(name, builder)

    return add


def make_launcher(name: str, *, workers: int | None, device: str, sweep_dir: Path,
                  slurm: dict[str, Any] | None = None) -> Launcher:
    """The launcher registered as `name` (unknown: UserError naming the choices)."""
    return LAUNCHERS.get(name)(workers=workers, device=device, sweep_dir=Path(sweep_dir),
                               slurm=slurm)
