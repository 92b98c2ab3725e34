"""2-D t-SNE embedding of features (van der Maaten & Hinton 2008), seeded and subsampled."""

from __future__ import annotations

import numpy as np


def subsample_indices(groups: np.ndarray, max_per_group: int, seed: int = 0) -> np.ndarray:
    """Sorted indices keeping at most `max_per_group` random samples of every group value."""
    rng = np.random.default_rng(seed)
    keep = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) > max_per_group:
            idx = rng.choice(idx, size=max_per_group, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(n, 2) t-SNE of `features` (n, d); PCA init, perplexity capped at (n - 1) / 3."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    perplexity = min(perplexity, (n - 1) / 3.0)
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    return tsne.fit_transform(features).astype(np.float64)
