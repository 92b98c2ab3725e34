"""What a training run carries besides its modules, and how it stops: `TrainState` (what a
checkpoint stores next to the weights) with its statistics `Window`, the seeds of its random
streams (`derive_seed`), and `deferred_stop` (the first SIGINT/SIGTERM becomes a flag the
loop checks between iterations). Used by `domadapt.engine`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np


@dataclass
class Window:
    """Sums of per-iteration statistics since the last evaluation."""

    sums: dict[str, float] = field(default_factory=dict)
    iters: int = 0
    images: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)  # iterations that reported each stat

    def add(self, stats: dict[str, float], images: int, seconds: float) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.iters += 1
        self.images += images
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        """Each statistic's mean over the iterations that reported it (a method in phases,
        e.g. ADDA, reports other statistics in each phase)."""
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Window:
        """From `vars(window)`; a window saved before `counts` existed had every statistic at
        every iteration."""
        d = dict(d)
        d.setdefault("counts", {k: d["iters"] for k in d["sums"]})
        return cls(**d)


@dataclass
class TrainState:
    """Progress of a run besides the modules: what a checkpoint stores next to the weights."""

    iteration: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    window: Window = field(default_factory=Window)
    last_window: dict[str, float] = field(default_factory=dict)  # means of the last full window
    last_eval: dict[str, Any] | None = None
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    train_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration, "log": self.log, "window": vars(self.window),
            "last_window": self.last_window, "last_eval": self.last_eval,
            "wall_seconds": self.wall_seconds, "train_seconds": self.train_seconds,
            "train_images": self.train_images,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        d = dict(d)
        d["window"] = Window.from_dict(d["window"])
        return cls(**d)


def derive_seed(seed: int, stream: str) -> int:
    """An independent 32-bit seed for one named random stream of a run."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1)[0])


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; `kill`, Slurm's stop/preempt signal


@contextlib.contextmanager
def deferred_stop(enabled: bool = True) -> Iterator[Any]:
    """Turn the first SIGINT or SIGTERM into a flag the loop checks between iterations (so the
    checkpoint it then writes is consistent); a second one interrupts at once. A signal the
    process ignores (SIGINT of a job a script put in the background) stays ignored. Main
    thread only."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hit = [False]
    previous = {s: h for s in STOP_SIGNALS if (h := signal.getsignal(s)) != signal.SIG_IGN}

    def handler(signum: int, frame: FrameType | None) -> None:
        if hit[0]:
            raise KeyboardInterrupt
        hit[0] = True

    for s in previous:
        signal.signal(s, handler)
    try:
        yield lambda: hit[0]
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: set outside Python
