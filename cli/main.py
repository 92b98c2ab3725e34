"""`domadapt` entry point: assembles the sub-commands and turns user errors into one line."""

from __future__ import annotations

import errno
import sys

import typer

from domadapt.errors import UserError

app = typer.Typer(
    name="domadapt",
    help="Domain adaptation with Batch-Instance Normalization and DANN.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from cli import analysis, data, sweep, train

    app.add_typer(data.app, name="data")
    train.register(app)
    sweep.register(app)
    analysis.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a UserError or an OS error (missing path, full disk) ends in one line."""
    try:
        app(args=argv, prog_name="domadapt")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        what = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            what = "no space left on device"
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {what}{where}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
