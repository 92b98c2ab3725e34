"""Search distributions of hyper-parameters (random search, as DomainBed's), drawn reproducibly.

A distribution is declared next to the option it searches: a plug-in's
`hparam(1.0, "help", search=LogUniform(0.1, 10))`, a core setting's in
`domadapt.hparam_search.CORE_SEARCH`. `draw(u)` maps one number u in [0, 1) to a value;
`unit(*parts)` derives u from a SHA-256 of its parts (the search seed, the run's seed, the
trial, the option's name), so a drawn value depends on nothing else: not on the order in which
options are declared, not on which other options exist, not on a random generator's state or
version, not on the platform.

- `Uniform(low, high)`: low + (high - low) u.
- `LogUniform(low, high)`: uniform in log space, low > 0 (learning rates, weights, decays).
- `Choice(a, b, ...)`: one of the values, equally likely (ints, strings, bools).

Continuous draws are rounded to 4 significant digits (and kept inside [low, high]): config.json
and the command line show them as one would type them, and the run key, which hashes them,
never hangs on the last bit of a platform's `exp`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

from domadapt.errors import UserError

__all__ = ["Choice", "Distribution", "LogUniform", "Uniform", "unit"]

DIGITS = 4  # significant digits of a continuous draw


class Distribution(Protocol):
    """What a search distribution offers (`Uniform`, `LogUniform`, `Choice`)."""

    def draw(self, u: float) -> Any: ...

    def contains(self, value: Any) -> bool: ...

    def check(self, kind: type, flag: str, choices: tuple[Any, ...] | None = None) -> None: ...


def unit(*parts: Any) -> float:
    """A number in [0, 1) fixed by `parts` (ints and strings): 52 bits of their SHA-256."""
    digest = hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()
    return int(digest[:13], 16) / 16**13


def _rounded(x: float, low: float, high: float) -> float:
    return min(max(float(f"{x:.{DIGITS}g}"), low), high)


def _check_bounds(name: str, low: float, high: float, *, positive: bool = False) -> None:
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name}({low}, {high}): needs finite low < high")
    if positive and low <= 0:
        raise ValueError(f"{name}({low}, {high}): needs low > 0")


def _check_float(dist: Any, kind: type, flag: str) -> None:
    if kind is not float:
        raise UserError(f"option {flag} ({kind.__name__}) declares search={dist}, which draws "
                        "floats; declare a Choice of its values instead")


@dataclass(frozen=True)
class Uniform:
    """low + (high - low) u."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_bounds("Uniform", self.low, self.high)

    def draw(self, u: float) -> float:
        return _rounded(self.low + (self.high - self.low) * u, self.low, self.high)

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def check(self, kind: type, flag: str, choices: tuple[Any, ...] | None = None) -> None:
        _check_float(self, kind, flag)

    def __str__(self) -> str:
        return f"Uniform({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class LogUniform:
    """exp(log low + (log high - log low) u): every decade between low and high equally likely."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_bounds("LogUniform", self.low, self.high, positive=True)

    def draw(self, u: float) -> float:
        lo, hi = math.log(self.low), math.log(self.high)
        return _rounded(math.exp(lo + (hi - lo) * u), self.low, self.high)

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def check(self, kind: type, flag: str, choices: tuple[Any, ...] | None = None) -> None:
        _check_float(self, kind, flag)

    def __str__(self) -> str:
        return f"LogUniform({self.low:g}, {self.high:g})"


class Choice:
    """One of `values`, equally likely: `Choice(16, 32, 64)`."""

    __slots__ = ("values",)

    def __init__(self, *values: Any) -> None:
        if not values:
            raise ValueError("Choice() needs at least one value")
        if len(set(map(repr, values))) < len(values):
            raise ValueError(f"Choice{values!r}: a value is listed twice")
        self.values = tuple(values)

    def draw(self, u: float) -> Any:
        return self.values[min(int(u * len(self.values)), len(self.values) - 1)]

    def contains(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def check(self, kind: type, flag: str, choices: tuple[Any, ...] | None = None) -> None:
        wrong = [v for v in self.values if not (
            type(v) is kind or (kind is float and type(v) is int))]
        if wrong:
            raise UserError(f"option {flag} ({kind.__name__}) declares search={self} with "
                            f"{wrong[0]!r}, not a {kind.__name__}")
        if choices is not None and (bad := [v for v in self.values if v not in choices]):
            raise UserError(f"option {flag} declares search={self} with {bad[0]!r}, not one of "
                            f"its choices {', '.join(map(str, choices))}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Choice) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return f"Choice({', '.join(map(repr, self.values))})"

    __str__ = __repr__
