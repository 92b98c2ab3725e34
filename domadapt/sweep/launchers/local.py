"""The `local` launcher: the cells one after another in this process, or with several workers
in spawned worker processes (`ProcessLauncher`), one GPU each where there are GPUs."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
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
from domadapt.system import usable_cores


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


def visible_gpus(device: str) -> list[str]:
    """CUDA device ids to hand out, one per worker: CUDA_VISIBLE_DEVICES or every GPU for
    `auto`/`cuda`; none for `cpu` or an explicit device such as `cuda:1`."""
    if device not in ("auto", "cuda"):
        return []
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@register_launcher("local")
def local_launcher(*, workers: int | None, device: str, sweep_dir: Path,
                   slurm: dict[str, Any] | None) -> Launcher:
    """In this process, or with more than one worker in worker processes. `workers=None`
    means one per visible GPU (one for `mps`: a Mac has one), else one per CPU core (each on
    one thread)."""
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
