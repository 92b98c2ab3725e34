"""One run of a RunConfig into a run directory, resumable at any point (`run`), and loading a
trained run back (`load_trained`).

The protocol per setting is in `domadapt.settings`, the loop and its log in `domadapt.engine`,
the files in `domadapt.rundir`. metrics.json (written last: the done marker) holds the numbers
of the LAST iteration's evaluation: target_acc, source_acc, per_class_target_acc, the method's
statistics over the last log window (e.g. cls_loss, domain_loss, disc_acc, train_acc), the
norm's diagnostics (e.g. mean_gate, gate_frac_below_0.1), iters, wall_seconds, train_seconds,
images_per_second, run_key, name, world_size, device; multidomain adds domain_acc and avg_acc.
No model selection: target labels are only ever used to report, never to pick anything.
"""

from __future__ import annotations

import contextlib
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torchvision

from domadapt.config import RunConfig
from domadapt.distributed import DistContext, distributed_context
from domadapt.engine import NonFiniteLoss, Trainer
from domadapt.errors import UserError
from domadapt.models import DomainAdaptModel, build_model
from domadapt.rundir import METRICS, RunDir
from domadapt.settings import RunData, build_data, resolve_config

__all__ = ["NonFiniteLoss", "build_data", "load_trained", "resolve_config", "run"]

T = TypeVar("T")


def run(cfg: RunConfig, run_dir: Path, *, device: str = "auto",
        quiet: bool = False) -> dict[str, Any]:
    """Train `cfg` into `run_dir` and return its metrics (the content of metrics.json).

    A finished run (metrics.json present) is not retrained: its stored metrics are returned.
    An unfinished one continues from its checkpoint, ending with the same numbers an
    uninterrupted run would have (bit-identical on CPU). A run_dir holding a different
    configuration is refused (UserError). Under torchrun, trains with DDP (rank 0 writes).
    Global RNG states of the caller are restored on return.
    """
    rd = RunDir(run_dir)
    with distributed_context(device) as ctx, _isolated_rng(ctx.device):
        cfg = _agree(ctx, lambda: resolve_config(cfg))  # rank 0 generates styledigits if needed
        finished = _agree(ctx, lambda: _check_run_dir(cfg, rd))
        if finished is not None:
            return finished
        data = build_data(cfg)
        trainer = Trainer(cfg, data, rd, ctx, quiet=quiet)  # bad weights etc. fail here
        if ctx.is_main:
            _write_config(cfg, data, rd, ctx, channels_last=trainer.channels_last)
        trainer.load_checkpoint()
        trainer.fit()
        metrics = trainer.metrics()
        if ctx.is_main:
            for name, table in trainer.norm.records(trainer.model).items():
                rd.write_table(name, table)
            rd.write_metrics(metrics)
        ctx.barrier()
        return metrics


def load_trained(run_dir: Path, device: str = "cpu", *, require_finished: bool = True
                 ) -> tuple[RunConfig, DomainAdaptModel]:
    """(config, model in eval mode with the checkpoint's weights) of a run directory."""
    rd = RunDir(run_dir)
    cfg, info = rd.read_config()
    if require_finished and not rd.is_done():
        raise UserError(f"{rd.path}: the run is not finished (no {METRICS})")
    if not rd.checkpoint_path.is_file():
        raise UserError(f"{rd.checkpoint_path}: no checkpoint (committed sweeps leave them "
                        f"out); to rebuild it, delete {rd.metrics_path} and re-run the command "
                        f"in {rd.config_path} (runtime.command): the run trains again")
    ckpt = rd.read_checkpoint(map_location="cpu")
    model = build_model(cfg, len(info["data"]["classes"]), load_pretrained=False)
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in ckpt["method"].items()
                           if k.startswith(prefix)})
    return cfg, model.to(torch.device(device)).eval()


# -- helpers ------------------------------------------------------------------------------------

def _check_run_dir(cfg: RunConfig, rd: RunDir) -> dict[str, Any] | None:
    """Refuse a run_dir of another configuration; the stored metrics if the run is finished."""
    if not rd.has_config():
        return None
    stored, _ = rd.read_config()
    if stored.key() != cfg.key():
        mine, theirs = cfg.to_dict(), stored.to_dict()
        diff = [f"{k}: {v!r} -> {mine[k]!r}" for k, v in theirs.items()
                if mine.get(k) != v and k != "root"]
        raise UserError(f"{rd.path} holds a different run ({'; '.join(diff[:4])}); "
                        f"choose another --out")
    if rd.is_done():
        return rd.read_metrics()
    return None


def _write_config(cfg: RunConfig, data: RunData, rd: RunDir, ctx: DistContext, *,
                  channels_last: bool) -> None:
    """config.json: the resolved config, its key, the data and the runtime of this launch."""
    rd.write_config({
        "config": cfg.to_dict(), "key": cfg.key(), "name": cfg.name(), "data": data.info,
        "runtime": {
            "device": str(ctx.device), "world_size": ctx.world_size,
            "memory_format": "channels_last" if channels_last else "NCHW",
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            **_hardware(ctx.device), "command": shlex.join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    })


def _hardware(device: torch.device) -> dict[str, Any]:
    """What floating-point results depend on besides the config: the CPU model and the kernel
    set torch picked for it (AVX2, AVX512, ...), the thread count, and the GPU if one is used.
    The same config on another CPU model or thread count gives other numbers."""
    model = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    info = {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _agree(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and hand its result (or its UserError) to every rank."""
    if not ctx.distributed:
        return fn()
    result: tuple[str, Any]
    if ctx.is_main:
        try:
            result = ("ok", fn())
        except UserError as e:
            result = ("error", str(e))
    else:
        result = ("ok", None)
    result = ctx.broadcast_object(result)
    if result[0] == "error":
        raise UserError(result[1])
    return result[1]


@contextlib.contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Restore the caller's python / numpy / torch (CPU and `device`) RNG states afterwards."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
