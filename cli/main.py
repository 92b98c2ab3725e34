"""`domadapt` entry point: assembles the sub-commands and turns user errors into one line."""

from __future__ import annotations

import errno
import inspect
import signal
import sys
from types import FrameType

import click
import typer

from domadapt.errors import UserError

app = typer.Typer(
    name="domadapt",
    help="Domain adaptation with Batch-Instance Normalization and DANN.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion; registry names complete
)


def _register() -> None:
    from . import analysis, data, plugins, sweep, train

    app.add_typer(data.app, name="data")
    train.register(app)
    sweep.register(app)
    analysis.register(app)
    plugins.register(app)
    _unwrap_help(app)


def _unwrap_help(typer_app: typer.Typer) -> None:
    """A docstring's single line breaks are source layout: join each paragraph of every
    command's help into one line, so that help wraps to the terminal (typer's rich mode would
    print the source's breaks in the command list)."""
    for info in typer_app.registered_commands:
        text = info.help or inspect.getdoc(info.callback) or ""
        info.help = "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))
    for group in typer_app.registered_groups:
        _unwrap_help(group.typer_instance)


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
        code = _invoke(argv)
    except typer.TyperException as e:  # bad option, missing argument, unknown command
        _fail(e.format_message(), getattr(e, "exit_code", 2))
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C / SIGTERM outside a run's own handler
        _fail("interrupted", 130)
    except UserError as e:  # 1: failed at run time; 2: a UsageError (as click's own)
        _fail(str(e), e.exit_code)
    except OSError as e:
        what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        _fail(what + where, 1)
    sys.exit(code if isinstance(code, int) else 0)


def _invoke(argv: list[str] | None) -> object:
    """Run the command; its return value or `typer.Exit` code. Unlike `app()`, which turns a
    KeyboardInterrupt into a silent Exit(130), it lets the interrupt reach `main`."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    # What click's main() does first: answer a shell's completion request (_DOMADAPT_COMPLETE
    # set by the completion script) and exit; a no-op otherwise.
    command._main_shell_completion({}, "domadapt", "_DOMADAPT_COMPLETE")
    try:
        with command.make_context("domadapt", args) as ctx:
            return command.invoke(ctx)
    except (typer.Exit, click.exceptions.Exit) as e:
        return e.exit_code


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
