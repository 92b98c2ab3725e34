"""A fixed, seeded, stratified subset of a domain's images: what `--eval-max-images` evaluates.

    n_c = floor(n x N_c / N) per class c (N_c of the N images), then one more image for the
    classes with the largest remainders until sum n_c = n (ties: the lower label)

Each class's images are put in path order and permuted by a generator seeded with (seed, c,
STREAM) (a stream of its own, apart from `split_items`' (seed, c)), its first n_c kept; the subset comes back in path order. It depends only on the items, n and the
seed (not on the input order), so every evaluation of a run sees the same images.
"""

from __future__ import annotations

import math

import numpy as np

from domadapt.data.manifest import Items

STREAM = 1  # tells this generator apart from split_items' one under the same seed


def stratified_subset(items: Items, n: int, seed: int = 0) -> Items:
    """At most `n` of `items`, each class in proportion to its share (module docstring)."""
    ordered = sorted(items, key=lambda item: item[0].as_posix())
    if n >= len(ordered):
        return ordered
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(ordered):
        by_class.setdefault(label, []).append(i)
    quota = {c: n * len(idx) / len(ordered) for c, idx in by_class.items()}
    take = {c: math.floor(q) for c, q in quota.items()}
    for c in sorted(quota, key=lambda c: (-(quota[c] - take[c]), c))[:n - sum(take.values())]:
        take[c] += 1
    kept: set[int] = set()
    for c, idx in by_class.items():
        perm = np.random.default_rng([seed, c, STREAM]).permutation(len(idx))
        kept.update(idx[j] for j in perm[:take[c]])
    return [item for i, item in enumerate(ordered) if i in kept]
