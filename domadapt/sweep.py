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
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any, Protocol

from domadapt.config import RunConfig, check_choice, make_config
from domadapt.data.registry import check_outside_root
from domadapt.errors import UserError
from domadapt.io import atomic_write_json, atomic_write_text
from domadapt.progress import progress
from domadapt.rundir import ERROR, METRICS, RECORD, RUNS_DIR, RunDir, cell_dir, run_lock
from domadapt.system import usable_cores
from domadapt.tables import Layout, dataset_layout, write_tables

LAUNCHERS = ("local", "submitit")
# Cell outcomes.
RAN, FINISHED, BUSY, FAILED = "ran", "finished", "busy", "failed"

Runner = Callable[..., dict]  # train.run(cfg, run_dir, *, device, quiet) -> metrics
Cell = tuple[RunConfig, Path]  # a config and its run dir


@dataclass(frozen=True)
class CellResult:
    """What happened to one cell: RAN (here), FINISHED (by someone else), BUSY or FAILED."""

    run_dir: Path
    status: str
    error: str | None = None


@dataclass(frozen=True)
class SweepPlan:
    """The cells of a sweep, how its tables are laid out, and its record for sweep.json."""

    configs: tuple[RunConfig, ...]
    layout: Layout
    record: dict[str, Any]


@dataclass
class SweepReport:
    total: int
    skipped: int = 0  # finished before this sweep started
    ran: int = 0
    finished_elsewhere: int = 0
    failed: list[CellResult] = field(default_factory=list)


# -- the grid -----------------------------------------------------------------------------------

def split_list(text: str, option: str) -> list[str]:
    """`a,b,,a` -> [a, b]: comma-separated, stripped, de-duplicated; UserError when empty."""
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not items:
        raise UserError(f"{option} is empty")
    return items


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in split_list(text, "--seeds"):
        try:
            seeds.append(int(item))
        except ValueError:
            raise UserError(f"--seeds: {item!r} is not an integer") from None
    return seeds


def resolve_tasks(dataset: str, root: str | Path | None, text: str) -> list[tuple[str, str]]:
    """`all` -> every ordered pair of distinct domains; else `S:T,S:T` (full or short names,
    `S->T` also accepted) resolved to full names, in the dataset's canonical order."""
    from domadapt.data import get_dataset

    spec = get_dataset(dataset)
    canonical = spec.tasks(root)
    if text.strip().lower() == "all":
        return canonical
    tasks = set()
    for item in split_list(text, "--tasks"):
        source, sep, target = item.replace("->", ":").partition(":")
        if not sep or not source.strip() or not target.strip():
            raise UserError(f"--tasks: {item!r} is not SOURCE:TARGET")
        task = (spec.resolve_domain(source, root), spec.resolve_domain(target, root))
        if task[0] == task[1]:
            raise UserError(f"--tasks: {item!r} has the same source and target domain")
        tasks.add(task)
    return [t for t in canonical if t in tasks]


def build_grid(
    tasks: Sequence[tuple[str, str]],
    methods: Sequence[str],
    norms: Sequence[str],
    seeds: Sequence[int],
    *,
    multidomain: bool,
    preset: str | None = None,
    **options: Any,
) -> list[RunConfig]:
    """Every cell: seeds outermost (a whole seed finishes first), then tasks, methods, norms;
    with `multidomain`, one multi-domain cell per norm closes each seed. `options` are
    RunConfig fields (None = preset/default)."""
    cells = []
    for seed in seeds:
        cells += [make_config(preset, **options, setting="transfer", source=s, target=t,
                              method=m, norm=n, seed=seed)
                  for s, t in tasks for m in methods for n in norms]
        if multidomain:
            cells += [make_config(preset, **options, setting="multidomain",
                                  method="source-only", norm=n, seed=seed) for n in norms]
    return cells


def plan_sweep(
    *,
    dataset: str,
    root: str | None,
    tasks: str,
    methods: str,
    norms: str,
    seeds: str,
    multidomain: bool,
    preset: str | None = None,
    command: str = "",
    **options: Any,
) -> SweepPlan:
    """Parse the grid options (as typed on the command line) into a SweepPlan."""
    from domadapt.data import get_dataset, resolve_root

    method_list, norm_list = split_list(methods, "--methods"), split_list(norms, "--norms")
    seed_list = parse_seeds(seeds)
    spec = get_dataset(dataset)
    data_root = str(resolve_root(spec, root))
    task_list = resolve_tasks(spec.name, data_root, tasks)
    configs = build_grid(task_list, method_list, norm_list, seed_list, multidomain=multidomain,
                         preset=preset, dataset=spec.name, root=data_root, **options)
    layout = dataset_layout(spec.name, data_root, task_list, method_list, norm_list, multidomain)
    record = {
        "command": command, "dataset": spec.name, "root": data_root, "preset": preset,
        "tasks": [list(t) for t in task_list], "methods": method_list, "norms": norm_list,
        "seeds": seed_list, "multidomain": multidomain,
        "options": {k: v for k, v in options.items() if v is not None},
    }
    return SweepPlan(tuple(configs), layout, record)


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


CellFn = Callable[[RunConfig, Path], CellResult]


# -- launchers ----------------------------------------------------------------------------------

class Launcher(Protocol):
    def launch(self, fn: CellFn, cells: Sequence[Cell]) -> Generator[CellResult, None, None]:
        """Run `fn` on every cell; yield the results as cells complete."""


class LocalLauncher:
    """One cell after another, in this process."""

    def launch(self, fn: CellFn, cells: Sequence[Cell]) -> Generator[CellResult, None, None]:
        for cfg, run_dir in cells:
            yield fn(cfg, run_dir)


@dataclass(frozen=True)
class ProcessLauncher:
    """`workers` spawned processes, each handed one cell at a time (no queue to drain).

    Worker i sees only GPU `gpus[i % len(gpus)]` (CUDA_VISIBLE_DEVICES) when `gpus` is given
    and runs torch on `threads` threads. A worker that dies fails its cell and is replaced.
    When the sweep stops early (Ctrl-C, an error), each busy worker gets one SIGINT, which
    train.run turns into a checkpoint and a stop, and `grace_seconds` to exit. A worker gets
    its first cell only once it says it is ready (signal handlers armed): one still starting
    holds no cell and is killed silently, not interrupted in the middle of its imports (which
    printed a traceback per worker); an interrupt never cuts a worker's start in two.
    """

    workers: int
    threads: int = 1
    gpus: tuple[str, ...] = ()
    grace_seconds: float = 120.0

    def launch(self, fn: CellFn, cells: Sequence[Cell]) -> Generator[CellResult, None, None]:
        ctx = mp.get_context("spawn")  # fresh interpreters: no inherited CUDA or thread state
        pending = list(reversed(cells))
        slots: list[_Slot] = []
        try:
            for i in range(min(self.workers, len(pending))):
                gpu = self.gpus[i % len(self.gpus)] if self.gpus else None
                with _interrupts_deferred():  # a started worker is always in `slots`
                    slots.append(_Slot(ctx, fn, gpu, self.threads))
                slots[-1].give(pending)
            while busy := [s for s in slots if s.cell is not None]:
                mp_wait([s.conn for s in busy] + [s.process.sentinel for s in busy])
                for slot in busy:
                    if (result := slot.result()) is not None:
                        slot.give(pending)  # before the consumer's work (tables) on the result
                        yield result
        finally:
            for slot in slots:
                slot.stop()
            deadline = time.monotonic() + self.grace_seconds
            for slot in slots:
                slot.process.join(max(0.0, deadline - time.monotonic()))
                if slot.process.is_alive():
                    _kill_group(slot.process.pid)  # the worker and its data loaders
                    slot.process.kill()  # not yet its own group leader (setpgrp) if just spawned
                    slot.process.join()
                slot.conn.close()


class _Slot:
    """One worker process of a ProcessLauncher and the cell it is running (None: idle)."""

    def __init__(self, ctx: Any, fn: CellFn, gpu: str | None, threads: int) -> None:
        self.ctx, self.fn, self.gpu, self.threads = ctx, fn, gpu, threads
        self.cell: Cell | None = None
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.ready = False  # until the worker's READY: no cell sent, no SIGINT
        self.process = self.ctx.Process(target=_worker_main, name="domadapt-sweep-worker",
                                        args=(child, self.fn, self.gpu, self.threads, os.getpid()))
        with _interrupts_deferred():  # cut short, start() leaves a worker reading EOF
            self.process.start()
        child.close()

    def give(self, pending: list[Cell]) -> None:
        """Hand the worker the next pending cell, if any (sent once it is ready)."""
        self.cell = pending.pop() if pending else None
        if self.cell is not None and self.ready:
            self.conn.send(self.cell)

    def result(self) -> CellResult | None:
        """The finished cell's result, a failure if the worker died (then restarted), or None."""
        assert self.cell is not None
        if self.conn.poll():
            try:
                message = self.conn.recv()
                if message != READY:
                    return message
                self.ready = True
                self.conn.send(self.cell)
                return None
            except (EOFError, ConnectionError):
                pass  # died right after the poll
        elif self.process.is_alive():
            return None
        self.process.join()
        failed = CellResult(self.cell[1], FAILED,
                            f"worker process died (exit code {self.process.exitcode})")
        self.conn.close()
        self._start()
        return failed

    def stop(self) -> None:
        """Idle: tell the worker to exit. Busy: SIGINT, so train.run checkpoints and stops.
        Still starting: killed (it holds no cell)."""
        if not self.process.is_alive():
            return
        if not self.ready:
            self.process.kill()
            return
        if self.cell is not None:
            os.kill(self.process.pid, signal.SIGINT)  # Windows: terminates it (no checkpoint)
            return
        with suppress(OSError):
            self.conn.send(None)


def _worker_main(conn: Any, fn: CellFn, gpu: str | None, threads: int, parent_pid: int) -> None:
    """A ProcessLauncher worker: pin GPU and threads (before torch starts: the cell function
    imports it lazily), then run the cells it is sent until None. Its own process group keeps
    a terminal's Ctrl-C to the parent, which forwards exactly one SIGINT (a second one would
    skip train.run's checkpoint); SIGINT is re-armed, as a sweep put in the background by a
    script starts with it ignored. Windows has no process groups: there the worker stays in
    the sweep's console group."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if (torch := sys.modules.get("torch")) is not None:  # else torch reads the variables
        torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        conn.send(READY)
        while (cell := conn.recv()) is not None:
            conn.send(fn(*cell))
    except (KeyboardInterrupt, EOFError, ConnectionError):
        pass  # stopped by the sweep, or the sweep is gone (reset or broken pipe, either way)


READY = "ready"  # a worker's first message: its signal handlers are armed


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM arriving during the block are acted on at its end (where signals
    can be handled: the main thread), so the block is never cut in the middle."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for s in dict.fromkeys(caught):
        signal.raise_signal(s)


def _exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """A killed sweep must not leave workers holding cell locks: when orphaned, kill this
    worker's process group (itself and its data-loader processes)."""
    while os.getppid() == parent_pid:
        time.sleep(poll_seconds)
    _kill_group(os.getpid())  # this worker leads its group (setpgrp)
    os._exit(1)


def _kill_group(leader: int) -> None:
    """SIGKILL the process group that `leader` leads (a worker and its data loaders), where
    the OS has process groups; elsewhere (Windows) nothing: the caller ends the process."""
    if hasattr(os, "killpg"):
        with suppress(OSError):
            os.killpg(leader, signal.SIGKILL)


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


def make_launcher(name: str, *, workers: int | None, device: str, sweep_dir: Path,
                  slurm: dict[str, Any] | None = None) -> Launcher:
    """The launcher called `name`; `local` with more than one worker runs processes.

    `workers=None` means one per visible GPU (one for `mps`: a Mac has one), else one per
    CPU core (each on one thread).
    """
    check_choice("launcher", name, LAUNCHERS)
    if name == "submitit":
        if workers is not None:
            raise UserError("--workers applies to --launcher local (submitit runs a job per cell)")
        defaults: dict[str, Any] = {"timeout_min": 24 * 60, "nodes": 1, "tasks_per_node": 1}
        if device != "cpu":
            defaults["gpus_per_node"] = 1
        return SubmititLauncher(Path(sweep_dir) / "submitit", {**defaults, **(slurm or {})})
    if slurm:
        raise UserError("--slurm needs --launcher submitit")
    gpus = visible_gpus(device)
    cores = usable_cores()
    if workers is None:
        workers = 1 if device.startswith("mps") else len(gpus) or cores
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if workers == 1:
        return LocalLauncher()
    return ProcessLauncher(workers, threads=max(1, cores // workers), gpus=tuple(gpus))


def visible_gpus(device: str) -> list[str]:
    """CUDA device ids to hand out, one per worker: CUDA_VISIBLE_DEVICES or every GPU for
    `auto`/`cuda`; none for `cpu` or an explicit device such as `cuda:1`."""
    if device not in ("auto", "cuda"):
        return []
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# -- the sweep ----------------------------------------------------------------------------------

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
    atomic_write_json(sweep_dir / RECORD, {
        **plan.record, "results": os.path.relpath(results_dir, sweep_dir), "layout": plan.layout.to_dict(),
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
