"""`domadapt train` (one source -> target run), `domadapt multidomain` (one model, all domains),
`domadapt dg` (domain generalization: every domain but the target -> the unseen target).

Every option left out takes the preset's value, else the RunConfig / plug-in default. Under
`torchrun --nproc_per_node N -m cli train ...` the run trains with DDP on N processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from domadapt.config import make_config
from domadapt.presets import PRESETS

from .options import config_options, option, usage_errors

Out = Annotated[Path, option("--out", help="run directory (re-run: resume; finished: no retraining)")]
Preset = Annotated[str | None, option("--preset", help=" | ".join(PRESETS.names()), default="none",
                                     registry="preset")]
Device = Annotated[str, option("--device", default="auto", help=(
    "auto (CUDA if available, else CPU) | cpu | cuda | cuda:N | mps (Apple GPU, float32)"))]
Quiet = Annotated[bool, option("--quiet", "-q", help="no progress bar")]


def register(app: typer.Typer) -> None:
    """Add `train`, `multidomain` and `dg` to the top-level app."""

    @app.command("train")
    @config_options()
    def train(out: Out, preset: Preset = None, device: Device = "auto", quiet: Quiet = False,
              options: dict[str, Any] | None = None) -> None:
        """Train one source -> target run; prints the target accuracy (last iteration)."""
        metrics = _run(options or {}, out, preset, device, quiet, setting="transfer")
        _echo(f"target accuracy (last iteration): {metrics['target_acc']:.4f}   "
              f"source: {metrics['source_acc']:.4f}   -> {out}")

    @app.command("multidomain")
    @config_options(exclude=("method", "source", "target"))
    def multidomain(out: Out, preset: Preset = None, device: Device = "auto",
                    quiet: Quiet = False, options: dict[str, Any] | None = None) -> None:
        """One source-only model on the train split of all domains; per-domain test accuracy."""
        metrics = _run(options or {}, out, preset, device, quiet, setting="multidomain",
                       method="source-only")
        per_domain = "  ".join(f"{d}: {a:.4f}" for d, a in metrics["domain_acc"].items())
        _echo(f"test accuracy  {per_domain}  average: {metrics['avg_acc']:.4f}   -> {out}")

    @app.command("dg")
    @config_options(exclude=("source",), setting="dg")
    def dg(out: Out, preset: Preset = None, device: Device = "auto", quiet: Quiet = False,
           options: dict[str, Any] | None = None) -> None:
        """Domain generalization (DomainBed's protocol): one model on every domain but
        --target, pooled (source-only ERM), that never reads a target image while it trains;
        prints the held-out domain's accuracy (last iteration) and the training-domain
        validation accuracy (--source-val-fraction of each training domain, default 0.2:
        `domadapt tables --select source`)."""
        metrics = _run(options or {}, out, preset, device, quiet, setting="dg")
        val = metrics["val_source"]
        held = "none held out" if val is None else f"{val:.4f}"
        _echo(f"held-out domain accuracy (last iteration): {metrics['target_acc']:.4f}   "
              f"training-domain validation: {held}   -> {out}")


def _run(options: dict[str, Any], out: Path, preset: str | None, device: str, quiet: bool,
         **fixed: Any) -> dict[str, Any]:
    from domadapt.data import get_dataset
    from domadapt.train import run

    with usage_errors():
        cfg = make_config(preset, **options, **fixed)
        get_dataset(cfg.dataset)  # an unknown name is a usage error, found before any work
    try:
        return run(cfg, out, device=device, quiet=quiet)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; re-run the same command to resume from {out}", err=True)
        raise typer.Exit(130) from None


def _echo(line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(line)
