"""Hyper-parameter search: K configurations per sweep cell, trial 0 the defaults (DomainBed's
random search; `domadapt sweep --n-hparams K --hparams-seed S`).

What is searched. Every option that declares a distribution (`hparam(..., search=...)` in a
plug-in, `domadapt.distributions`) of the cell's method and norm, and the core settings of
`CORE_SEARCH` (one place, DomainBed's: learning rate, weight decay, batch size). Options given
explicitly on the command line are held fixed (as DomainBed's `--hparams` overrides its draws);
a preset's values are the defaults, so they are searched.

The draws. Trial 0 is the cell itself: the defaults, with the key it had before searches
existed, so a search reuses every run already made and `--n-hparams 1` is an ordinary sweep.
Trial t >= 1 draws each searched option from its distribution with u = `unit("hparams", S,
seed, t, option name)`: a function of the search seed S, the cell's --seeds value, the trial
and the option alone. Hence
- reproducible and resumable: re-running the sweep draws the same values, so it finds the
  same run keys and skips or resumes those runs; `--n-hparams 8` after 4 adds trials 4..7;
- shared across tasks, methods and norms (DomainBed shares its draws across test
  environments and algorithms the same way): trial t of a BN cell and of a BIN cell run the
  same learning rate, weight decay, batch size and method options, so a paired comparison
  at one trial differs in the norm alone, and an option shared by two plug-ins (DANN's and
  CDAN's `adv_weight`) gets one value;
- drawn anew for each seed, as DomainBed draws anew for each `trial_seed`: a seed repeats the
  whole procedure, search included, so the spread over seeds of a selected result counts
  the luck of the draws too, not only that of the training.

Identity. The drawn values are ordinary config values (config.json, the run key). The run
also records `hparams_seed` and `hparams_trial`, which enter the key only when set (trial 0
leaves both unset): two trials of a cell, or two searches, that happen to draw identical
values (a search over `Choice`s only) stay distinct runs, so a cell always has K runs and each
trial's directory says which draw it was; the run name ends in `_h<t>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from domadapt.config import RunConfig, core_fields
from domadapt.distributions import Choice, Distribution, LogUniform, unit
from domadapt.errors import UserError
from domadapt.methods import get_method
from domadapt.norms import get_norm
from domadapt.registry import hparam_specs

__all__ = ["CORE_SEARCH", "check_search", "draw_trial", "search_space", "trial_configs"]

# The core settings a search draws (DomainBed searches the same three), in one place.
CORE_SEARCH: dict[str, Distribution] = {
    "lr": LogUniform(1e-3, 1e-1),
    "weight_decay": LogUniform(1e-5, 1e-2),
    "batch_size": Choice(16, 32, 64),
}


def check_search(n_hparams: int, hparams_seed: int) -> None:
    """One-line UserError unless K >= 1 and S >= 0."""
    if isinstance(n_hparams, bool) or not isinstance(n_hparams, int) or n_hparams < 1:
        raise UserError(f"--n-hparams must be an integer >= 1, got {n_hparams}")
    if isinstance(hparams_seed, bool) or not isinstance(hparams_seed, int) or hparams_seed < 0:
        raise UserError(f"--hparams-seed must be an integer >= 0, got {hparams_seed}")


def search_space(cfg: RunConfig, fixed: Iterable[str] = ()) -> dict[str, Distribution]:
    """Option name -> distribution for `cfg`'s cell: CORE_SEARCH, then its method's and its
    norm's declared searches, less the names in `fixed`."""
    fixed = set(fixed)
    space = dict(CORE_SEARCH)
    for cls in (get_method(cfg.method).Hparams, get_norm(cfg.norm).Hparams):
        space.update({s.name: s.search for s in hparam_specs(cls) if s.search is not None})
    return {name: dist for name, dist in space.items() if name not in fixed}


def draw_trial(cfg: RunConfig, hparams_seed: int, trial: int,
               fixed: Iterable[str] = ()) -> RunConfig:
    """Trial `trial` of `cfg`'s cell (module docstring): `cfg` itself for trial 0; else `cfg`
    with every searched option drawn and `hparams_seed` / `hparams_trial` recorded."""
    check_search(1, hparams_seed)
    if trial < 0:
        raise ValueError(f"trial {trial} < 0")
    if trial == 0:
        return cfg
    values = {name: dist.draw(unit("hparams", hparams_seed, cfg.seed, trial, name))
              for name, dist in search_space(cfg, fixed).items()}
    core = {f.name for f in core_fields()}
    method_names = set(cfg.method_options)
    norm_names = set(cfg.norm_options)
    changes: dict[str, Any] = {k: v for k, v in values.items() if k in core}
    changes["method_options"] = {**cfg.method_options,
                                 **{k: v for k, v in values.items() if k in method_names}}
    changes["norm_options"] = {**cfg.norm_options,
                               **{k: v for k, v in values.items() if k in norm_names}}
    return cfg.replace(**changes, hparams_seed=hparams_seed, hparams_trial=trial)


def trial_configs(cfg: RunConfig, n_hparams: int, hparams_seed: int,
                  fixed: Iterable[str] = ()) -> list[RunConfig]:
    """The K = `n_hparams` trials of `cfg`'s cell, trial 0 first. With K > 1 and nothing left
    to search (every searched setting given explicitly), a one-line UserError."""
    check_search(n_hparams, hparams_seed)
    fixed = set(fixed)
    if n_hparams > 1 and not search_space(cfg, fixed):
        raise UserError(f"--n-hparams {n_hparams}: nothing to search for {cfg.name()}: every "
                        f"searched setting is given explicitly ({', '.join(sorted(fixed))})")
    return [draw_trial(cfg, hparams_seed, t, fixed) for t in range(n_hparams)]
