"""Summaries of the BIN gates rho (one per channel, in [0, 1]) of a trained model.

BIN (Nam & Kim 2018) normalises y = gamma * (rho * x_BN + (1 - rho) * x_IN) + beta, so rho -> 1
keeps batch statistics (content) and rho -> 0 keeps instance statistics (style removed).
Per layer l with channels c = 1..C_l:

    mean rho_l   = (1 / C_l) sum_c rho_lc
    frac < 0.1   = #{c : rho_lc < 0.1} / C_l     (strict; "near-0" gates, IN-like channels)
    frac > 0.9   = #{c : rho_lc > 0.9} / C_l     (strict; "near-1" gates, BN-like channels)
    histogram    = counts over 10 equal bins of [0, 1] (last bin closed)

Totals over the whole network weight every channel equally (mean over all sum_l C_l gates),
which is the definition of `mean_gate` and `gate_frac_below_0.1` in metrics.json.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from domadapt.errors import UserError
from domadapt.nn import GATE_HIGH as HIGH
from domadapt.nn import GATE_LOW as LOW

RECORD = "gates.csv"  # a BIN run's `summarize_gates` table, written when training ends
HIST_EDGES = np.linspace(0.0, 1.0, 11)
HIST_COLUMNS = [f"hist_{lo:.1f}_{hi:.1f}" for lo, hi in itertools.pairwise(HIST_EDGES)]
COLUMNS = ["layer", "depth", "channels", "mean", "std", "min", "max",
           f"frac_below_{LOW}", f"frac_above_{HIGH}", *HIST_COLUMNS]


def _as_numpy(v: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu().numpy()
    return np.asarray(v, dtype=np.float64).ravel()


def summarize_gates(gates: Mapping[str, torch.Tensor | np.ndarray]) -> pd.DataFrame:
    """One row per layer (in the mapping's order = network order), columns `COLUMNS`."""
    rows = []
    for depth, (name, values) in enumerate(gates.items()):
        rho = _as_numpy(values)
        counts, _ = np.histogram(np.clip(rho, 0.0, 1.0), bins=HIST_EDGES)
        rows.append({
            "layer": name,
            "depth": depth,
            "channels": rho.size,
            "mean": rho.mean(),
            "std": rho.std(),
            "min": rho.min(),
            "max": rho.max(),
            f"frac_below_{LOW}": float((rho < LOW).mean()),
            f"frac_above_{HIGH}": float((rho > HIGH).mean()),
            **dict(zip(HIST_COLUMNS, counts.astype(np.int64))),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def gate_totals(summary: pd.DataFrame) -> dict[str, float | int]:
    """Network-wide mean rho and fractions, every channel weighted equally."""
    w = summary["channels"].to_numpy(dtype=np.float64)
    total = float(w.sum())
    if total == 0:
        raise ValueError("empty gate summary")
    return {
        "layers": len(summary),
        "channels": int(total),
        "mean": float((summary["mean"] * w).sum() / total),
        f"frac_below_{LOW}": float((summary[f"frac_below_{LOW}"] * w).sum() / total),
        f"frac_above_{HIGH}": float((summary[f"frac_above_{HIGH}"] * w).sum() / total),
    }


def gate_summary(model: torch.nn.Module) -> pd.DataFrame:
    """`summarize_gates` of every BatchInstanceNorm2d in `model`; UserError if there is none."""
    from domadapt.nn import gate_values

    gates = gate_values(model)
    if not gates:
        raise UserError("the model has no BIN layers (train with --norm bin to get gates)")
    return summarize_gates(gates)
