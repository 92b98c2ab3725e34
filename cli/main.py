"""`domadapt` entry point: assembles the sub-commands and turns user errors into one line."""

from __future__ import annotations

import errno
import signal
import sys
from types import FrameType

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
    from cli import analysis, data, plugins, sweep, train

    app.add_typer(data.app, name="data")
    train.register(app)
    sweep.register(app)
    analysis.register(app)
    plugins.register(app)


try:
    _register()
    _SETUP_ERROR: UserError | None = None
except UserError as e:  # e.g. a plug-in option that clashes with a core setting
    _SETUP_ERROR = e


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A bad option, a UserError or an OS error (missing path, full disk) ends in
    one line on stderr and a non-zero exit, never a traceback."""
    stop_on_sigterm()
    if _SETUP_ERROR is not None:  # the commands could not be built: say why in one line
        _fail(str(_SETUP_ERROR), 2)
    try:
        code = app(args=argv, prog_name="domadapt", standalone_mode=False)
    except typer.TyperException as e:  # bad option, missing argument, unknown command
        _fail(e.format_message(), getattr(e, "exit_code", 2))
    except typer.Abort:  # Ctrl-C outside a run's own handler
        _fail("interrupted", 130)
    except UserError as e:
        _fail(str(e), 2)
    except OSError as e:
        what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        _fail(what + where, 1)
    sys.exit(code if isinstance(code, int) else 0)


def stop_on_sigterm() -> None:
    """Let SIGTERM (`kill`, Slurm's stop signal) take the Ctrl-C path: a run checkpoints, a
    sweep stops its workers, the exit is one line and code 130 (unless SIGTERM is ignored)."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _fail(message: str, code: int) -> None:
    message = " ".join(message.split())
    if message:  # empty after `no_args_is_help` printed the help
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
