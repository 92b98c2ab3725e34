"""The `submitit` launcher: one Slurm job per cell through submitit."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domadapt.errors import UserError
from domadapt.sweep.launchers.base import (
    FAILED,
    Cell,
    CellFn,
    CellResult,
    Launcher,
    register_launcher,
)


@dataclass(frozen=True)
class SubmititLauncher:
    """One job per cell through submitit (Slurm; `cluster="local"` or `"debug"` for tests)."""

    folder: Path
    parameters: dict[str, Any] = field(default_factory=dict)  # executor.update_parameters
    cluster: str | None = None  # None: Slurm when sbatch is found, else local processes
    poll_seconds: float = 10.0

    def launch(self, fn: CellFn, cells: Sequence[Cell]) -> Generator[CellResult, None, None]:
        try:
            import submitit
        except ImportError:
            raise UserError("--launcher submitit needs the submitit package: "
                            "pip install 'domadapt[slurm]'") from None
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        try:
            executor.update_parameters(**self.parameters)
        except (ValueError, TypeError, NameError) as e:
            raise UserError(f"--slurm: {e}") from None
        with executor.batch():
            jobs = [executor.submit(fn, cfg, run_dir) for cfg, run_dir in cells]
        run_dirs = {id(job): run_dir for job, (_, run_dir) in zip(jobs, cells)}
        for job in submitit.helpers.as_completed(jobs, poll_frequency=self.poll_seconds):
            try:
                yield job.result()
            except Exception as e:  # noqa: BLE001 -- the job failed (time limit, node)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                yield CellResult(run_dirs[id(job)], FAILED, f"job {job.job_id}: {first}")


@register_launcher("submitit")
def submitit_launcher(*, workers: int | None, device: str, sweep_dir: Path,
                      slurm: dict[str, Any] | None) -> Launcher:
    """One Slurm job per cell (submitit), with `slurm` over the defaults."""
    if workers is not None:
        raise UserError("--workers applies to --launcher local (submitit runs a job per cell)")
    defaults: dict[str, Any] = {"timeout_min": 24 * 60, "nodes": 1, "tasks_per_node": 1}
    if device != "cpu":
        defaults["gpus_per_node"] = 1
    return SubmititLauncher(Path(sweep_dir) / "submitit", {**defaults, **(slurm or {})})
