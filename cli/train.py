"""`domadapt train` (one source -> target run), `domadapt multidomain` (one model, all domains).

Every option left out takes the preset's value, else the RunConfig default. Under
`torchrun --nproc_per_node N -m domadapt train ...` the run trains with DDP on N processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from domadapt.config import BACKBONES, METHODS, NORMS, PRESETS, make_config

_P = "Run"  # help panel names
_O = "Optimization"


def option(*names: str, help: str, panel: str = _P, **kw: Any) -> Any:
    """A typer option in a help panel, defaults hidden (None means: take the preset or default)."""
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kw)


Dataset = Annotated[str | None, option("--dataset", help="officehome | pacs | styledigits | folder")]
Root = Annotated[Path | None, option("--root", help="dataset folder (optional for styledigits)")]
Norm = Annotated[str | None, option("--norm", help=" | ".join(NORMS))]
Backbone = Annotated[str | None, option("--backbone", help=" | ".join(BACKBONES))]
Pretrained = Annotated[str | None, option("--pretrained", help="imagenet | none | PATH (state dict)")]
Out = Annotated[Path, option("--out", help="run directory (re-run: resume; finished: no retraining)")]
Preset = Annotated[str | None, option("--preset", help=" | ".join(PRESETS))]
Device = Annotated[str, option("--device", help="auto | cpu | cuda")]
Quiet = Annotated[bool, option("--quiet", "-q", help="no progress bar")]
Iters = Annotated[int | None, option("--iters", help="training iterations")]
BatchSize = Annotated[int | None, option("--batch-size", help="images per domain per iteration")]
ImageSize = Annotated[int | None, option("--image-size", help="crop size (pixels)")]
ResizeSize = Annotated[int | None, option("--resize-size", help="resize before cropping")]
Seed = Annotated[int | None, option("--seed", help="random seed")]
Lr = Annotated[float | None, option("--lr", help="head learning rate lr0", panel=_O)]
BackboneLr = Annotated[float | None, option("--backbone-lr-mult", help="backbone lr x", panel=_O)]
GateLr = Annotated[float | None, option("--gate-lr-mult", help="BIN gate lr multiplier", panel=_O)]
Wd = Annotated[float | None, option("--weight-decay", help="SGD weight decay", panel=_O)]
Momentum = Annotated[float | None, option("--momentum", help="SGD momentum", panel=_O)]
BottleneckDim = Annotated[int | None, option("--bottleneck-dim", help="feature dimension", panel=_O)]
EvalEvery = Annotated[int | None, option("--eval-every", help="evaluate every N iterations")]
CkptEvery = Annotated[int | None, option("--checkpoint-every", help="checkpoint every N iterations")]
Workers = Annotated[int | None, option("--num-workers", help="data-loading processes")]
Source = Annotated[str | None, option("--source", help="source domain (full or short name)")]
Target = Annotated[str | None, option("--target", help="target domain (full or short name)")]
Method = Annotated[str | None, option("--method", help=" | ".join(METHODS))]
AdvWeight = Annotated[float | None, option("--adv-weight", help="DANN loss weight", panel=_O)]
DiscHidden = Annotated[int | None, option("--disc-hidden", help="DANN discriminator width", panel=_O)]
SplitSeed = Annotated[int | None, option("--split-seed", help="train/test split seed")]
TestFraction = Annotated[float | None, option("--test-fraction", help="test share of each domain")]
Amp = Annotated[bool | None, option("--amp/--no-amp", help="mixed precision on CUDA")]


def register(app: typer.Typer) -> None:
    """Add `train` and `multidomain` to the top-level app."""

    @app.command("train")
    def train(
        out: Out, dataset: Dataset = None, root: Root = None,
        source: Source = None, target: Target = None, method: Method = None,
        norm: Norm = None, backbone: Backbone = None, pretrained: Pretrained = None,
        iters: Iters = None, batch_size: BatchSize = None, image_size: ImageSize = None,
        resize_size: ResizeSize = None, seed: Seed = None, preset: Preset = None,
        device: Device = "auto", quiet: Quiet = False, lr: Lr = None,
        backbone_lr_mult: BackboneLr = None, gate_lr_mult: GateLr = None, weight_decay: Wd = None,
        momentum: Momentum = None, bottleneck_dim: BottleneckDim = None,
        adv_weight: AdvWeight = None, disc_hidden: DiscHidden = None,
        eval_every: EvalEvery = None, checkpoint_every: CkptEvery = None,
        num_workers: Workers = None, amp: Amp = None,
    ) -> None:
        """Train one source -> target run (source-only or DANN); prints the target accuracy."""
        options = dict(locals())
        metrics = _run(options, setting="transfer")
        _echo(f"target accuracy (last iteration): {metrics['target_acc']:.4f}   "
              f"source: {metrics['source_acc']:.4f}   -> {out}")

    @app.command("multidomain")
    def multidomain(
        out: Out, dataset: Dataset = None, root: Root = None,
        norm: Norm = None, backbone: Backbone = None, pretrained: Pretrained = None,
        iters: Iters = None, batch_size: BatchSize = None, image_size: ImageSize = None,
        resize_size: ResizeSize = None, seed: Seed = None, preset: Preset = None,
        device: Device = "auto", quiet: Quiet = False, lr: Lr = None,
        backbone_lr_mult: BackboneLr = None, gate_lr_mult: GateLr = None, weight_decay: Wd = None,
        momentum: Momentum = None, bottleneck_dim: BottleneckDim = None,
        split_seed: SplitSeed = None, test_fraction: TestFraction = None,
        eval_every: EvalEvery = None, checkpoint_every: CkptEvery = None,
        num_workers: Workers = None, amp: Amp = None,
    ) -> None:
        """One source-only model on the train split of all domains; per-domain test accuracy."""
        options = dict(locals())
        metrics = _run(options, setting="multidomain", method="source-only")
        per_domain = "  ".join(f"{d}: {a:.4f}" for d, a in metrics["domain_acc"].items())
        _echo(f"test accuracy  {per_domain}  average: {metrics['avg_acc']:.4f}   -> {out}")


def _run(options: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    from domadapt.train import run

    out, device, quiet, preset = (options.pop(k) for k in ("out", "device", "quiet", "preset"))
    if options.get("root") is not None:
        options["root"] = str(options["root"])
    cfg = make_config(preset, **options, **fixed)
    try:
        return run(cfg, out, device=device, quiet=quiet)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; re-run the same command to resume from {out}", err=True)
        raise typer.Exit(130) from None


def _echo(line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(line)
