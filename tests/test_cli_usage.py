"""The command line as a user meets it: exit codes (1: failed at run time, 2: usage), shell
completion of registry names, help texts that wrap to the terminal."""

from __future__ import annotations

import pytest
import typer

from cli.main import app
from domadapt.backbones import BACKBONES
from domadapt.methods import METHODS


def completions(run_cli, monkeypatch: pytest.MonkeyPatch, line: str) -> list[str]:
    """What bash completion offers for the last word of `line` (typer's own protocol)."""
    monkeypatch.setenv("_DOMADAPT_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", line)
    monkeypatch.setenv("COMP_CWORD", str(len(line.split()) - (0 if line.endswith(" ") else 1)))
    code, out, err = run_cli()
    assert code == 0, err
    return out.split()


@pytest.mark.parametrize(("line", "expected"), [
    ("domadapt train --norm b", ["bn", "bin"]),
    ("domadapt train --method dann", ["dann", "dann-mcc"]),
    ("domadapt multidomain --preset office", ["officehome", "officehome-ganin"]),
    ("domadapt train --dataset p", ["pacs"]),
    ("domadapt sweep --dataset s", ["styledigits"]),
    ("domadapt sweep --norms bn,b", ["bn,bn", "bn,bin"]),
    ("domadapt sweep --methods source-only,cdan", ["source-only,cdan", "source-only,cdan-e"]),
    ("domadapt data check --dataset o", ["officehome"]),
])
def test_registry_names_complete(run_cli, monkeypatch, line, expected) -> None:
    assert completions(run_cli, monkeypatch, line) == expected


def test_completion_follows_the_registries(run_cli, monkeypatch) -> None:
    assert completions(run_cli, monkeypatch, "domadapt train --backbone resnet1") == [
        n for n in BACKBONES.names() if n.startswith("resnet1")]
    assert set(completions(run_cli, monkeypatch, "domadapt train --method ")) == set(
        METHODS.names())


def test_completion_can_be_installed(run_cli) -> None:
    code, out, err = run_cli("--show-completion", "bash")
    assert code == 0 and "_DOMADAPT_COMPLETE=complete_bash" in out, (code, err)


def test_exit_codes(run_cli, tmp_path) -> None:
    code, _, err = run_cli("tables", tmp_path / "no-sweep")  # fails at run time
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    code, _, err = run_cli("train", "--preset", "styledigits", "--source", "gray", "--target",
                           "gray", "--out", tmp_path / "r")  # a bad option combination
    assert code == 2 and "same domain" in err and err.count("\n") == 1
    code, _, err = run_cli("train", "--norm")  # click's own usage error
    assert code == 2 and err.count("\n") == 1
    for args in (("train", "--source", "a", "--target", "b"), ("sweep",)):
        code, _, err = run_cli(*args, "--dataset", "no-such-dataset", "--out", tmp_path / "x")
        assert code == 2 and "unknown dataset" in err and err.count("\n") == 1, args


def test_help_wraps_to_the_terminal(run_cli, monkeypatch) -> None:
    """Each command's summary is its docstring's first paragraph joined into one line
    (not the source's line breaks), wrapped to the terminal's width."""
    monkeypatch.setenv("COLUMNS", "1000")
    code, out, _ = run_cli("--help")
    assert code == 0
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name in ("versus", "gate-knockout", "multidomain", "tables"):
        summary = commands[name].help.split("\n\n")[0]
        assert "\n" not in summary and summary in out, name
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli("--help")
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80
    assert "which the sweeps differ" in " ".join(line.strip(" │") for line in out.splitlines())
