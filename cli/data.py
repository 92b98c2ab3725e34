"""`domadapt data ...` commands."""

import typer

app = typer.Typer(help="Datasets: manifests, checks, caches, the embedded styledigits.", no_args_is_help=True)
