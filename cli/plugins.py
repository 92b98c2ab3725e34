"""`domadapt methods` and `domadapt backbones`: what is registered, with hyper-parameters."""

from __future__ import annotations

import typer


def _hparam_lines(cls: type) -> list[str]:
    from domadapt.registry import hparam_specs

    return [f"    {s.flag:<22} {s.type.__name__:<6} default {s.default!s:<10} {s.help}"
            + ("" if s.search is None else f"; searched: {s.search}")
            for s in hparam_specs(cls)]


def register(app: typer.Typer) -> None:
    @app.command("methods")
    def methods() -> None:
        """List the training methods and normalization kinds with their options and defaults."""
        from domadapt.methods import METHODS
        from domadapt.norms import NORMS

        lines = ["methods (--method):"]
        for name, cls in METHODS.items():
            lines += [f"  {name}: {cls.help}", *_hparam_lines(cls.Hparams)]
        lines.append("norms (--norm):")
        for name, kind in NORMS.items():
            lines += [f"  {name}: {kind.help}", *_hparam_lines(kind.Hparams)]
        from domadapt.hparam_search import CORE_SEARCH

        lines.append("searched core settings (sweep --n-hparams):")
        lines += [f"    --{k.replace('_', '-'):<20} {v}" for k, v in CORE_SEARCH.items()]
        typer.echo("\n".join(lines))

    @app.command("backbones")
    def backbones() -> None:
        """List the backbones (--backbone) and backbone families."""
        from domadapt.backbones import BACKBONES, FAMILIES

        typer.echo("\n".join([*BACKBONES.names(), *(f"{p}:<name>" for p in FAMILIES.names())]))
