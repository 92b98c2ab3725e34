"""`domadapt sweep` (a grid of runs, resumable, tables after every cell) and `domadapt tables`."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from domadapt.data import DATASETS
from domadapt.errors import UserError
from domadapt.selection import select_help
from domadapt.sweep.launchers import LAUNCHERS

from .options import config_options, option, usage_errors
from .train import Device, Preset, Quiet

_G, _L, _S = "Grid", "Launcher", "Hyper-parameter search"

SweepDataset = Annotated[str, option("--dataset", help=" | ".join(DATASETS.names()), panel=_G,
                                     registry="dataset")]
SweepOut = Annotated[Path, option("--out",
                                help="sweep directory: runs/, sweep.json (re-run to resume)")]
Root = Annotated[Path | None, option("--root", help="dataset folder (optional for styledigits)",
                                   panel=_G)]
Tasks = Annotated[str, option("--tasks", panel=_G,
                            help="all | none (only the --multidomain / --dg cells) | "
                            "S:T,S:T,... (full or short domain names)")]
Methods = Annotated[str, option("--methods", panel=_G, registry="method",
                              help="comma list of methods", default="source-only,dann")]
Norms = Annotated[str, option("--norms", help="comma list of norms", panel=_G, default="bn,bin",
                            registry="norm")]
Seeds = Annotated[str, option("--seeds", help="comma list of integers", panel=_G)]
Multidomain = Annotated[bool, option("--multidomain/--no-multidomain", panel=_G,
                                   help="also one multi-domain run per norm and seed")]
DomainGeneralization = Annotated[bool, option(
    "--dg/--no-dg", panel=_G, help="also the leave-one-domain-out (domain generalization) runs: "
    "one per held-out domain, norm and seed, source-only, each trained on every other domain")]
NHparams = Annotated[int, option(
    "--n-hparams", panel=_S,
    help="configurations per cell: trial 0 = the defaults, trials 1..K-1 drawn from the declared "
         "search distributions (`domadapt methods`; lr, weight decay, batch size); options given "
         "explicitly are held fixed. The tables choose a trial per cell with --select")]
HparamsSeed = Annotated[int, option(
    "--hparams-seed", panel=_S,
    help="seed of the draws (a trial's values depend on it, the --seeds value, the trial and "
         "the option)")]
Results = Annotated[Path | None, option("--results",
                                      help="where the tables go (default: the sweep directory)")]
Launcher = Annotated[str, option(
    "--launcher", panel=_L, registry="launcher",
    help=" | ".join(LAUNCHERS.names()) + " (local: this process or --workers processes; "
         "submitit: one Slurm job per cell)")]
SweepWorkers = Annotated[int | None, option(
    "--workers", panel=_L,
    help="parallel worker processes for --launcher local (default: one per GPU, else one per "
         "CPU core, each on one thread)")]
Slurm = Annotated[list[str] | None, option(
    "--slurm", panel=_L,
    help="KEY=VALUE for submitit's update_parameters, e.g. slurm_partition=gpu (repeatable)")]

SELECT_HELP = (select_help()  # every rule, with its validator's help (domadapt.selection)
               + ". Of a hyper-parameter search (--n-hparams), a rule also chooses each "
               "cell's trial (last: trial 0, the defaults)")


SWEEP_HELP = (
    "Run every (task, method, norm, seed) cell, each in OUT/runs/<name>-<config hash>; "
    "with --multidomain and --dg also the multi-domain and leave-one-domain-out cells.\n\n"
    "Re-running skips finished cells and resumes unfinished ones from their checkpoint; "
    "sweeps sharing OUT split the cells between them. The tables (runs.csv, summary.csv, "
    "transfer_table.csv/.md, multidomain_table.csv/.md, dg_table.csv/.md, comparison.csv/.md, "
    "selection_table.csv/.md; each run's last evaluation) are rebuilt after every finished cell."
)


def register(app: typer.Typer) -> None:
    """Add `sweep` and `tables` to the top-level app."""

    @app.command("sweep", help=SWEEP_HELP)
    @config_options(exclude=("source", "target", "method", "norm", "seed"))
    def sweep(
        ctx: typer.Context, dataset: SweepDataset, out: SweepOut, root: Root = None,
        tasks: Tasks = "all", methods: Methods = "source-only,dann", norms: Norms = "bn,bin",
        seeds: Seeds = "0", multidomain: Multidomain = False, dg: DomainGeneralization = False,
        results: Results = None,
        preset: Preset = None, launcher: Launcher = "local", workers: SweepWorkers = None,
        slurm: Slurm = None, device: Device = "auto", quiet: Quiet = False,
        n_hparams: NHparams = 1, hparams_seed: HparamsSeed = 0,
        options: dict[str, Any] | None = None,
    ) -> None:
        """Run every cell of the grid (see SWEEP_HELP)."""
        from domadapt.sweep import make_launcher, plan_sweep, run_sweep

        train_options = options or {}
        with usage_errors():
            backend = make_launcher(launcher, workers=workers, device=device, sweep_dir=out,
                                    slurm=_key_values(slurm or [], "--slurm"))
            plan = plan_sweep(
                dataset=dataset, root=None if root is None else str(root), tasks=tasks,
                methods=methods, norms=norms, seeds=seeds, multidomain=multidomain, dg=dg,
                preset=preset, command=_command_line(ctx), n_hparams=n_hparams,
                hparams_seed=hparams_seed, **train_options,
            )
        for left in plan.record.get("left_out", []):
            typer.echo(f"note: {left['cells']} cells left out: {left['reason']}", err=True)
        try:
            report = run_sweep(plan, out, backend, results_dir=results, device=device,
                               quiet=quiet)
        except KeyboardInterrupt:
            typer.echo(f"interrupted; re-run the same command to resume {out}", err=True)
            raise typer.Exit(130) from None
        if not quiet:
            typer.echo(f"{report.total} cells: {report.ran} ran, {report.skipped} were done, "
                       f"{report.finished_elsewhere} finished by another sweep, "
                       f"{len(report.failed)} failed; tables in {results or out}")
        if report.failed:
            first = report.failed[0]
            raise UserError(f"{len(report.failed)} of {report.total} cells failed, first "
                            f"{first.run_dir.name}: {first.error} (see "
                            f"{first.run_dir}/error.txt); re-run to retry")

    @app.command("tables")
    def tables(
        sweep_dir: Annotated[Path, typer.Argument(help="a sweep directory (with runs/)",
                                                  show_default=False)],
        out: Annotated[Path | None, option("--out",
                                         help="where the tables go (default: SWEEP_DIR)")] = None,
        select: Annotated[str, option("--select", help=SELECT_HELP, registry="rule")] = "last",
    ) -> None:
        """Rebuild a sweep's tables from its run directories (also while it runs), with
        comparison.csv/.md (paired tests over seeds) and selection_table.csv/.md."""
        from domadapt.tables import write_tables

        for path in write_tables(sweep_dir, out, select=select):
            typer.echo(str(path))

    @app.command("versus")
    def versus(
        sweep_a: Annotated[Path, typer.Argument(help="sweep A (the reference)",
                                                show_default=False)],
        sweep_b: Annotated[Path, typer.Argument(help="sweep B, e.g. the same grid with one "
                                                "setting changed", show_default=False)],
        out: Annotated[Path | None, option("--out",
                                         help="where versus.csv/.md go (default: SWEEP_B)")] = None,
        select: Annotated[str, option("--select", help=SELECT_HELP, registry="rule")] = "last",
    ) -> None:
        """Sweep B against sweep A, runs paired by task, method, norm and seed: per task the
        means, B - A and its 95% t interval; over all pairs, and over the tasks' mean
        differences (with a t interval), a Wilcoxon signed-rank test; the settings on which
        the sweeps differ head the table (versus.csv/.md). With BIN runs on both sides, also
        their gates (versus_gates.csv, .png and a section of versus.md)."""
        from domadapt.analysis.report import versus_gates_report
        from domadapt.tables import write_versus

        out_dir = out if out is not None else sweep_b
        for path in write_versus(sweep_a, sweep_b, out_dir, select=select):
            typer.echo(str(path))
        if (figure := versus_gates_report(out_dir)) is not None:
            typer.echo(str(figure))


def _key_values(items: list[str], option: str) -> dict[str, Any]:
    """`["a=1", "b=x"]` -> {"a": 1, "b": "x"}: ints and floats parsed, the rest kept as text."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option}: {item!r} is not KEY=VALUE")
        for cast in (int, float, str):
            try:
                parsed[key.strip()] = cast(value)
                break
            except ValueError:
                continue
    return parsed


def _command_line(ctx: typer.Context) -> str:
    """The command as typed, normalized: every option given on the command line, in order;
    absolute paths made relative to the working directory (`provenance.portable_path`)."""
    from domadapt.provenance import portable_path

    words: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            words.append(param.opts[0] if value else param.secondary_opts[0])
        elif isinstance(value, (list, tuple)):
            for v in value:
                words += [param.opts[0], str(v)]
        else:
            text = str(value)
            words += [param.opts[0], portable_path(text) if os.path.isabs(text) else text]
    return f"{ctx.command_path} {shlex.join(words)}"
