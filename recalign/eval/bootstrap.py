"""Paired comparisons of two systems scored on the same rows: bootstrap intervals and a permutation test.

Resample row indices with replacement (the same draw for both systems), recompute each metric on the resample and
take percentiles of the difference. Works for per-row means (HR, NDCG) and for list-set metrics that are not sums
over rows (DivRatio, ORRatio, MGU), because the metric is recomputed from the resampled rows.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

MetricsOnRows = Callable[[np.ndarray], dict]


def paired_bootstrap(metrics_a: MetricsOnRows, metrics_b: MetricsOnRows, n_rows: int, keys: Sequence[str],
                     n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """{key: {"a", "b", "diff" (a - b on all rows), "low", "high" (percentile interval of the diff)}}.

    `metrics_a(index)` / `metrics_b(index)` return the metrics of rows `index` (an int array, repeats allowed).
    """
    if n_rows < 1:
        raise ValueError("paired_bootstrap needs at least one row")
    everything = np.arange(n_rows)
    full_a, full_b = metrics_a(everything), metrics_b(everything)
    rng = np.random.default_rng(seed)
    diffs = np.empty((n_resamples, len(keys)))
    for r in range(n_resamples):
        index = rng.integers(0, n_rows, n_rows)
        a, b = metrics_a(index), metrics_b(index)
        diffs[r] = [a[k] - b[k] for k in keys]
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail], axis=0)
    return {k: {"a": float(full_a[k]), "b": float(full_b[k]), "diff": float(full_a[k] - full_b[k]),
                "low": float(low[j]), "high": float(high[j])} for j, k in enumerate(keys)}


def paired_permutation_test(lists_a, lists_b, metrics: Callable, keys: Sequence[str], n_permutations: int = 1000,
                            seed: int = 0) -> dict[str, dict]:
    """Paired randomisation test of "A and B are exchangeable row by row" for any metric of a set of lists.

    `lists_a`, `lists_b`: tensors [rows, K] of the two systems on the same rows; `metrics(lists)` scores one
    system's lists. Each permutation swaps A's and B's lists on a random half of the rows. p = (1 + #{|diff_perm|
    >= |diff|}) / (1 + n). Unlike the bootstrap, no row is duplicated, so set metrics (DivRatio, ORRatio, MGU/DGU)
    keep their meaning. Returns {key: {"a", "b", "diff", "p_value"}}.
    """
    import torch

    a, b = metrics(lists_a), metrics(lists_b)
    observed = np.array([a[k] - b[k] for k in keys])
    generator = torch.Generator().manual_seed(seed)
    extreme = np.zeros(len(keys))
    for _ in range(n_permutations):
        swap = (torch.rand(lists_a.shape[0], generator=generator) < 0.5).unsqueeze(1)
        pa, pb = metrics(torch.where(swap, lists_b, lists_a)), metrics(torch.where(swap, lists_a, lists_b))
        extreme += np.abs([pa[k] - pb[k] for k in keys]) >= np.abs(observed) - 1e-12
    return {k: {"a": float(a[k]), "b": float(b[k]), "diff": float(observed[j]),
                "p_value": float((1 + extreme[j]) / (1 + n_permutations))} for j, k in enumerate(keys)}
