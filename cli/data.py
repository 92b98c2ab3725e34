"""`domadapt data ...` commands: thin wrappers over `domadapt.data`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from domadapt.data import DATASETS, get_dataset, list_datasets, resolve_root
from domadapt.data.manifest import build_manifests, resolve_domains, write_splits
from domadapt.data.registry import MANIFEST_DIRNAME, skipped_entries
from domadapt.data.styledigits import write_styledigits
from domadapt.data.tools import build_resized_cache, check_dataset
from domadapt.errors import UserError

from .options import complete

app = typer.Typer(
    help="Datasets: manifests, splits, checks, caches, the embedded styledigits.",
    no_args_is_help=True,
)

Dataset = Annotated[
    str, typer.Option("--dataset", "-D", help=" | ".join(DATASETS.names()),
                      autocompletion=complete("dataset"))
]
Root = Annotated[
    Path | None,
    typer.Option("--root", "-r", help="dataset root; styledigits: generated if omitted"),
]
Domains = Annotated[
    list[str] | None,
    typer.Option("--domain", "-d", help="domain (full or short name); repeatable; default all"),
]
ManifestDir = Annotated[
    Path | None,
    typer.Option(
        "--manifest-dir", help="read manifests from here (default <root>/manifests if present)"
    ),
]
Workers = Annotated[
    int | None, typer.Option("--workers", "-j", help="decode threads (default min(8, CPUs))")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]
SHOW_SKIPPED = 20  # `data check` lists at most this many skipped entries


@app.command("list")
def list_cmd() -> None:
    """List the known datasets and their domains."""
    for spec in list_datasets():
        domains = ", ".join(f"{d.name} ({d.short})" for d in spec.domains or ())
        typer.echo(
            f"{spec.name:12s} {spec.description}"
            + (f"\n{'':12s} domains: {domains}" if domains else "")
        )


@app.command()
def manifest(
    dataset: Dataset = "styledigits",
    root: Root = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help=f"default <root>/{MANIFEST_DIRNAME}")
    ] = None,
    domain: Domains = None,
) -> None:
    """Scan the folders; write <out>/<Domain>.txt ('relative/path label' lines) and classes.txt."""
    spec = get_dataset(dataset)
    root_path = resolve_root(spec, root)
    out_dir = out or root_path / MANIFEST_DIRNAME
    for d, n in build_manifests(spec, root_path, out_dir, domain).items():
        typer.echo(f"{d}: {n} images -> {out_dir / (d + '.txt')}")


@app.command()
def split(
    dataset: Dataset = "styledigits",
    root: Root = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help=f"manifest folder; default <root>/{MANIFEST_DIRNAME}"),
    ] = None,
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    test_fraction: Annotated[float, typer.Option(help="fraction of every class held out")] = 0.2,
    domain: Domains = None,
    manifest_dir: ManifestDir = None,
) -> None:
    """Write the stratified train/test split of each domain as manifests under <out>/splits/."""
    spec = get_dataset(dataset)
    root_path = resolve_root(spec, root)
    out_dir = out or root_path / MANIFEST_DIRNAME
    counts = write_splits(
        spec,
        root_path,
        out_dir,
        domain,
        seed=seed,
        test_fraction=test_fraction,
        manifest_dir=manifest_dir,
    )
    for d, (n_train, n_test) in counts.items():
        typer.echo(f"{d}: {n_train} train / {n_test} test")
    typer.echo(f"written under {out_dir / 'splits'}")


@app.command()
def styledigits(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to create")],
    seed: Annotated[int, typer.Option(help="generation seed (the cached default uses 0)")] = 0,
    quiet: Quiet = False,
) -> None:
    """Generate the styledigits dataset (4 styles x 1797 digits, 32x32 PNG) into --out."""
    start = time.perf_counter()
    made = write_styledigits(out, seed=seed, quiet=quiet)
    if made:
        typer.echo(f"styledigits written to {out} in {time.perf_counter() - start:.1f}s")
    else:
        typer.echo(f"styledigits already complete in {out}")


@app.command()
def cache(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder to create (a valid root itself)")
    ],
    dataset: Dataset = "styledigits",
    root: Root = None,
    size: Annotated[int, typer.Option(help="shorter side after resizing (never enlarged)")] = 256,
    domain: Domains = None,
    manifest_dir: ManifestDir = None,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Decode and resize every image once (JPEG q95), same layout, for faster training."""
    spec = get_dataset(dataset)
    root_path = resolve_root(spec, root)
    counts = build_resized_cache(
        spec, root_path, out, size, domain, manifest_dir=manifest_dir, workers=workers, quiet=quiet
    )
    typer.echo(f"{sum(counts.values())} images resized to {size}px -> {out}")


@app.command()
def check(
    dataset: Dataset = "styledigits",
    root: Root = None,
    domain: Domains = None,
    manifest_dir: ManifestDir = None,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Decode every image; print counts per domain against the expected ones; fail on problems."""
    spec = get_dataset(dataset)
    root_path = resolve_root(spec, root)
    start = time.perf_counter()
    reports = check_dataset(
        spec, root_path, domain, manifest_dir=manifest_dir, workers=workers, quiet=quiet
    )
    typer.echo(f"{spec.name} at {root_path}: {len(spec.class_names(root_path))} classes")
    skipped = skipped_entries(spec, root_path, resolve_domains(spec, root_path, domain))
    if skipped:
        typer.echo(f"skipped {len(skipped)} entries (hidden, left by archive tools, or not "
                   f"a known image type):")
        for path in skipped[:SHOW_SKIPPED]:
            typer.echo(f"  {path.relative_to(root_path)}{'/' if path.is_dir() else ''}")
        if len(skipped) > SHOW_SKIPPED:
            typer.echo(f"  ... and {len(skipped) - SHOW_SKIPPED} more")
    typer.echo(f"{'domain':14s} {'short':5s} {'images':>7s} {'expected':>8s}  status")
    for r in reports:
        expected = "-" if r.expected is None else str(r.expected)
        status = (
            "ok"
            if r.ok
            else (f"{len(r.unreadable)} unreadable" if r.unreadable else "count mismatch")
        )
        typer.echo(f"{r.domain:14s} {r.short:5s} {r.count:7d} {expected:>8s}  {status}")
    problems = [line for r in reports for line in r.unreadable]
    for line in problems:
        typer.echo(f"  {line}")
    problems += [
        f"{r.domain} has {r.count} images, expected {r.expected}"
        for r in reports
        if r.expected not in (None, r.count)
    ]
    total = sum(r.count for r in reports)
    typer.echo(f"{total} images decoded in {time.perf_counter() - start:.1f}s")
    if problems:
        more = f" (and {len(problems) - 1} more problems above)" if len(problems) > 1 else ""
        raise UserError(f"check failed: {problems[0]}{more}")
