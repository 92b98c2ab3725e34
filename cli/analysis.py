"""`domadapt gates | analyze | compare | gate-knockout | evidence | adabn | export-backbone`:
analysis and reuse of trained runs and sweeps (thin wrappers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunDir = Annotated[Path, typer.Argument(help="A run directory (config.json, checkpoint.pt).",
                                        show_default=False)]


def gates(
    run_dir: RunDir,
    out: Annotated[Path | None, typer.Option(
        help="Output folder [default: RUN_DIR/analysis].")] = None,
) -> None:
    """BIN gates per normalization layer: gates.csv and gates.png.

    Per layer in network order: depth, channels, mean rho, fractions < 0.1 and > 0.9, a
    10-bin histogram over [0, 1]. Fails with one line for a run without BIN layers.
    """
    from domadapt.analysis.report import default_out, gates_report
    from domadapt.norms.gates import HIGH, LOW

    _, totals = gates_report(run_dir, out)
    where = default_out(run_dir, out)
    typer.echo(f"{totals['layers']} BIN layers, {totals['channels']} gates: mean rho "
               f"{totals['mean']:.3f}, {totals[f'frac_below_{LOW}']:.1%} < {LOW}, "
               f"{totals[f'frac_above_{HIGH}']:.1%} > {HIGH}")
    typer.echo(f"wrote {where / 'gates.csv'} and {where / 'gates.png'}")


def analyze(
    run_dir: RunDir,
    out: Annotated[Path | None, typer.Option(
        help="Output folder [default: RUN_DIR/analysis].")] = None,
    max_per_domain: Annotated[int | None, typer.Option(
        help="Analyse at most N random images per domain [default: all].")] = None,
    tsne_per_domain: Annotated[int, typer.Option(
        help="Points per domain in the t-SNE figure.")] = 500,
    root: Annotated[str | None, typer.Option(
        help="Dataset root, if not where the run found it.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of subsampling, probe splits and t-SNE.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Proxy A-distance, t-SNE, per-class accuracy and confusion matrix of a trained run.

    Transfer runs: the whole source and target domains, accuracy scored on the target.
    Multi-domain runs: every domain's test split, A-distance for each pair of domains.
    Writes adistance.json/.csv, tsne.png/.csv, confusion.csv/.png, per_class_acc.csv.
    """
    from domadapt.analysis.report import analyze_report
    from domadapt.distributed import resolve_device

    res = analyze_report(run_dir, out, max_per_domain=max_per_domain,
                         tsne_per_domain=tsne_per_domain, root=root,
                         device=str(resolve_device(device)), seed=seed, quiet=quiet)
    for r in res.adistance.itertuples():
        typer.echo(f"proxy A-distance {r.features:10s} {r.domain_a} vs {r.domain_b}: "
                   f"{r.d_a:.3f} (probe error {r.err:.3f})")
    for domain, acc in res.accuracy.items():
        typer.echo(f"accuracy on {domain}: {acc:.2%}")
    typer.echo(f"wrote {res.out_dir}")


def compare(
    sweep_dir: Annotated[Path, typer.Argument(
        help="The sweep directory, or the folder its tables went to (--results).",
        show_default=False)],
) -> None:
    """Figures of a sweep's comparison tables: transfer_table.png, multidomain_table.png.

    Reads summary.csv (the numbers behind the tables; found in SWEEP_DIR or in the results
    folder recorded in SWEEP_DIR/sweep.json) and writes the figures beside it.
    """
    from domadapt.analysis.report import compare_report

    for path in compare_report(sweep_dir):
        typer.echo(f"wrote {path}")


def gate_knockout(
    sweep_dir: Annotated[Path, typer.Argument(
        help="A sweep directory with BIN runs.", show_default=False)],
    root: Annotated[str | None, typer.Option(
        help="Dataset root, if not where the runs found it.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """What BIN's instance-normalised share carries: each BIN run scored with its gates as
    trained and with every gate set to 1 (the batch path alone), beside the BN run of the same
    task, method and seed.

    Evaluates the runs that have a checkpoint and no gate_knockout.json yet (the record is kept
    in the run directory), then writes gate_knockout.csv/.md beside the sweep's tables: paired
    differences BIN - BIN gates=1, BIN gates=1 - BN, BIN - BN with t intervals and tests.
    """
    from domadapt.analysis.knockout import knockout_report
    from domadapt.distributed import resolve_device

    for path in knockout_report(sweep_dir, device=str(resolve_device(device)), root=root,
                                quiet=quiet):
        typer.echo(f"wrote {path}")


def evidence(
    sweep_dir: Annotated[Path, typer.Argument(
        help="A sweep directory with runs of both norms.", show_default=False)],
    method: Annotated[str, typer.Option(help="The method whose runs are compared.")] = "dann",
    baseline: Annotated[str, typer.Option(help="Norm b of a - b.")] = "bn",
    treatment: Annotated[str, typer.Option(help="Norm a of a - b.")] = "bin",
    gates_beside: Annotated[Path | None, typer.Option(
        help="Another sweep's tables folder whose gates (gates_by_layer.csv) the figure shows "
             "beside this sweep's, e.g. results/styledigits.", show_default=False)] = None,
) -> None:
    """The pre-registered analysis of TREATMENT against BASELINE (results/pacs-long/README.md):
    the primary comparison at the last evaluation and the secondary family (trajectory,
    AdaBN, selection rules, gate knockout, each domain left out), tasks as units, secondary
    p-values Holm-corrected; writes evidence.csv/.md/.png beside the sweep's tables.
    """
    from domadapt.analysis.evidence import evidence_report

    for path in evidence_report(sweep_dir, method=method, baseline=baseline,
                                treatment=treatment, gates_beside=gates_beside):
        typer.echo(f"wrote {path}")


def adabn(
    path: Annotated[Path, typer.Argument(
        help="A finished run directory, or a sweep directory (every finished --adabn run in "
             "it).", show_default=False)],
    root: Annotated[str | None, typer.Option(
        help="Dataset root, if not where the runs found it.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Re-estimate the final target_acc_adabn of finished --adabn runs from their checkpoints
    with this code (runs whose AdaBN estimate predates a change to it).

    Each checkpoint must first reproduce its run's recorded target accuracy bit for bit (same
    model, same numerics), else the command stops there with one line, that run unchanged.
    The new value replaces the old in metrics.json and log.csv's last row; config.json's
    `reevaluations` records the change.
    """
    from domadapt.errors import UserError
    from domadapt.progress import progress
    from domadapt.rundir import RunDir as Run
    from domadapt.rundir import sweep_run_dirs
    from domadapt.train import reestimate_adabn

    if (path / "config.json").is_file():
        runs = [path]
    else:
        runs = [r for r in sweep_run_dirs(path)
                if Run(r).is_done() and Run(r).read_config()[0].adabn]
        if not runs:
            raise UserError(f"{path}: neither a run directory nor a sweep directory with "
                            f"finished --adabn runs")
    for run_dir in progress(runs, quiet=quiet, desc="adabn"):
        before, after = reestimate_adabn(run_dir, device=device, root=root, quiet=True)
        typer.echo(f"{run_dir}: target_acc_adabn {before!r} -> {after!r}")


def export_backbone(
    run_dir: RunDir,
    out: Annotated[Path, typer.Argument(help="The state dict file to write (.pth).",
                                        show_default=False)],
) -> None:
    """Write a finished BN run's trained backbone as a state dict for `--pretrained OUT`.

    Two-stage training: e.g. a source-only BN run first, then adaptation runs (BN or BIN)
    that start from its backbone. BIN and the other converted norms are refused with one line.
    """
    from domadapt.train import export_backbone as export

    count = export(run_dir, out)
    typer.echo(f"wrote {out} ({count} tensors): use it with --pretrained {out}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command()(gates)
    app.command()(analyze)
    app.command()(compare)
    app.command("gate-knockout")(gate_knockout)
    app.command()(evidence)
    app.command()(adabn)
    app.command("export-backbone")(export_backbone)
