"""The one owner of the files on disk: a run directory and a sweep directory.

Run directory (written by `domadapt.train.run`)::

    config.json    {"config": RunConfig.to_dict(), "key", "name", "data": {...}, "runtime": {...}}
    log.csv        one row per evaluation (see `domadapt.engine`)
    checkpoint.pt  everything needed to continue bit-identically (atomic)
    checkpoint.prev.pt  the checkpoint before it, resumed from when checkpoint.pt is unreadable
                   (removed once metrics.json is written)
    metrics.json   written last, only when the run is complete: the done marker
    .lock          locked (`run_lock`) by the process training the run, for its whole life
    error.txt      traceback of the cell's last failure (sweeps)

Sweep directory::

    sweep.json     the command, grid, options and table Layout
    runs/<cfg.name()>-<cfg.key()>/   one run directory per cell

Every write is atomic (temp file, then rename), so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock, SoftFileLock, Timeout

from domadapt.config import RunConfig
from domadapt.errors import UserError
from domadapt.io import (
    CorruptFile,
    atomic_torch_save,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    read_json,
    spreadsheet_safe,
    verify_zip,
)

CONFIG = "config.json"
METRICS = "metrics.json"
LOG = "log.csv"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
LOCK = ".lock"
ERROR = "error.txt"
CHECKPOINT_FORMAT = 2  # 2: the method's whole state_dict under "method"

RECORD = "sweep.json"
RUNS_DIR = "runs"


class RunDir:
    """Paths and readers/writers of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_path = property(lambda self: self.path / CONFIG)
    metrics_path = property(lambda self: self.path / METRICS)
    log_path = property(lambda self: self.path / LOG)
    checkpoint_path = property(lambda self: self.path / CHECKPOINT)
    previous_checkpoint_path = property(lambda self: self.path / PREVIOUS_CHECKPOINT)
    lock_path = property(lambda self: self.path / LOCK)
    error_path = property(lambda self: self.path / ERROR)

    def is_done(self) -> bool:
        return self.metrics_path.is_file()

    def has_config(self) -> bool:
        return self.config_path.is_file()

    # -- config.json ----------------------------------------------------------------------------
    def read_config(self) -> tuple[RunConfig, dict[str, Any]]:
        """(RunConfig, whole config.json); UserError if missing or corrupt. The dataset root
        is stored relative to the working directory the run started in; it is returned
        absolute, resolved against today's working directory."""
        if not self.config_path.is_file():
            raise UserError(f"{self.config_path}: not a run directory (no {CONFIG})")
        try:
            info = read_json(self.config_path)
            cfg = RunConfig.from_dict(info["config"])
            if cfg.root is not None and not os.path.isabs(cfg.root):
                cfg = cfg.replace(root=os.path.abspath(cfg.root))
            return cfg, info
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.config_path}: corrupt run config ({e})") from None

    def read_config_dict(self) -> dict[str, Any]:
        """config.json as stored (no validation against today's plug-ins)."""
        info = self._read_json(self.config_path)
        if not isinstance(info.get("config"), dict):
            raise UserError(f"corrupt run config (no 'config' entry): {self.config_path}")
        return info

    def write_config(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.config_path, info)

    # -- metrics.json ---------------------------------------------------------------------------
    def read_metrics(self) -> dict[str, Any]:
        return self._read_json(self.metrics_path)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """The done marker; the fallback checkpoint is no longer needed after it."""
        atomic_write_json(self.metrics_path, metrics)
        self.previous_checkpoint_path.unlink(missing_ok=True)

    # -- log.csv --------------------------------------------------------------------------------
    def write_log(self, rows: list[dict[str, Any]]) -> None:
        """One row per evaluation (rewritten atomically as a whole); columns: the union of the
        rows' keys in first-seen order."""
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([spreadsheet_safe(k) for k in columns])
        for row in rows:
            writer.writerow(["" if row.get(k) is None else spreadsheet_safe(row[k])
                             for k in columns])
        atomic_write_text(self.log_path, buf.getvalue())

    def amend_last_log_row(self, values: dict[str, Any]) -> None:
        """Replace `values` (existing columns) in the log's last row; every other cell keeps
        its text exactly."""
        text = self.log_path.read_text() if self.log_path.is_file() else ""
        rows = list(csv.reader(io.StringIO(text)))
        if len(rows) < 2:
            raise UserError(f"{self.log_path}: no evaluated row")
        if missing := sorted(set(values) - set(rows[0])):
            raise UserError(f"{self.log_path}: no column {', '.join(missing)}")
        for column, value in values.items():
            rows[-1][rows[0].index(column)] = "" if value is None else str(value)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        atomic_write_text(self.log_path, buf.getvalue())

    def write_table(self, name: str, table: pd.DataFrame) -> None:
        """A CSV record beside the metrics (e.g. gates.csv), written atomically."""
        atomic_write_csv(self.path / name, table, index=False)

    def read_log(self) -> pd.DataFrame:
        if not self.log_path.is_file():
            raise UserError(f"{self.log_path}: no log (the run has not evaluated yet)")
        try:
            return pd.read_csv(self.log_path)
        except (ValueError, pd.errors.ParserError) as e:
            raise UserError(f"{self.log_path}: corrupt log ({e}); delete it and re-run") from None

    # -- checkpoint.pt --------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically; the checkpoint it replaces is kept as checkpoint.prev.pt."""
        atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, self.checkpoint_path,
                          keep_previous=self.previous_checkpoint_path)

    def read_checkpoint(self, map_location: str | torch.device = "cpu", *,
                        path: Path | None = None) -> dict[str, Any]:
        """checkpoint.pt (or `path`), its zip checksums verified; UserError if unreadable (what
        to do about it depends on the caller: resume or analysis)."""
        path = path or self.checkpoint_path
        try:
            verify_zip(path)  # torch.load would take a bit-rotted tensor as it is
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001  (truncated / foreign file: many types)
            why = str(e) if isinstance(e, CorruptFile) else type(e).__name__
            raise UserError(f"{path}: unreadable checkpoint ({why})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path}: not a domadapt checkpoint (format {CHECKPOINT_FORMAT})")
        return ckpt

    def read_latest_checkpoint(self, map_location: str | torch.device = "cpu"
                               ) -> dict[str, Any] | None:
        """The newest readable checkpoint: checkpoint.pt, else (with one line on stderr naming
        the bad file) checkpoint.prev.pt; None if there is neither. UserError naming the
        file(s) and what to do when none loads (truncated by a crash, corrupted on disk)."""
        bad: list[tuple[Path, str]] = []
        for path in (self.checkpoint_path, self.previous_checkpoint_path):
            if not path.is_file():
                continue
            try:
                ckpt = self.read_checkpoint(map_location, path=path)
            except UserError as e:
                bad.append((path, str(e).removeprefix(f"{path}: ")))
                continue
            if bad:
                print(f"warning: {bad[0][0]}: {bad[0][1]}; resuming from {path.name}, the "
                      f"checkpoint before it", file=sys.stderr)
            return ckpt
        if len(bad) == 2:
            raise UserError(f"{bad[0][0]}: {bad[0][1]}, and so is {bad[1][0].name}; delete both "
                            f"to restart the run from the beginning")
        if bad:
            raise UserError(f"{bad[0][0]}: {bad[0][1]}; delete it to restart the run from the "
                            f"beginning")
        return None

    def _read_json(self, path: Path) -> dict[str, Any]:
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise UserError(f"missing {path}") from None
        except ValueError as e:
            raise UserError(f"corrupt {path} ({e}); delete it to re-run") from None
        if not isinstance(data, dict):
            raise UserError(f"corrupt {path} (not a JSON object); delete it to re-run")
        return data


@contextmanager
def run_lock(run_dir: str | Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on `run_dir/.lock` (created with its folder). Yields False,
    holding nothing, when another process (or thread) holds it and not `wait`. Re-entrant in
    the thread holding it: the outermost holder (a sweep's cell) owns it and `train.run` inside
    nests without blocking. The operating system releases it when its holder dies (flock on
    POSIX, a locked handle on Windows, both through `filelock`), so a killed sweep or run never
    leaves a stale lock. (Only where neither exists, filelock falls back to a marker file,
    which releases by deletion and which a killed holder leaves behind.)"""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.resolve() / LOCK, preserve_lock_file=FileLock is not SoftFileLock,
                    is_singleton=True)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def cell_dir(sweep_dir: str | Path, cfg: RunConfig) -> Path:
    """`SWEEP_DIR/runs/<name>-<key>`: the key hashes the whole resolved config. A run made
    before weights files were keyed by their hash is found under its legacy key (the
    `--pretrained` string), so committed sweeps resume without retraining."""
    runs = Path(sweep_dir) / RUNS_DIR
    path = runs / f"{cfg.name()}-{cfg.key()}"
    legacy = runs / f"{cfg.name()}-{cfg.legacy_key()}"
    return legacy if not path.exists() and legacy.is_dir() else path


def sweep_run_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every run directory under `sweep_dir/runs`, sorted."""
    return sorted(p for p in (Path(sweep_dir) / RUNS_DIR).glob("*") if p.is_dir())
