"""Paired bootstrap intervals: exact where the answer is known, binomial width on a coin-flip difference."""

from __future__ import annotations

import numpy as np
import pytest

from recalign.eval.bootstrap import paired_bootstrap

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


def _mean_of(values: np.ndarray):
    return lambda index: {"m": float(values[index].mean())}


def test_constant_shift_has_a_zero_width_interval():
    base = np.random.default_rng(0).random(50)
    out = paired_bootstrap(_mean_of(base + 0.1), _mean_of(base), 50, ["m"], n_resamples=200)["m"]
    assert out["diff"] == pytest.approx(0.1) and out["low"] == pytest.approx(0.1) and out["high"] == pytest.approx(0.1)


def test_interval_width_matches_the_binomial_standard_error():
    n = 400
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, n).astype(float)      # per-row hits of system A
    b = np.zeros(n)                              # system B never hits: diff = mean(a), SE = sqrt(p(1-p)/n)
    out = paired_bootstrap(_mean_of(a), _mean_of(b), n, ["m"], n_resamples=2000, seed=3)["m"]
    p = a.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    assert out["diff"] == pytest.approx(p)
    assert out["low"] == pytest.approx(p - half, abs=0.01) and out["high"] == pytest.approx(p + half, abs=0.01)


def test_pairing_cancels_shared_row_noise():
    """Two systems that differ by one hit on 100 noisy rows: paired resampling keeps the interval tight."""
    rng = np.random.default_rng(2)
    b = rng.integers(0, 2, 100).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[0]] = 1.0
    out = paired_bootstrap(_mean_of(a), _mean_of(b), 100, ["m"], n_resamples=1000)["m"]
    assert out["diff"] == pytest.approx(0.01) and out["low"] >= 0.0 and out["high"] <= 0.04


def test_permutation_test_separates_a_real_set_difference_from_none():
    import torch

    from recalign.eval.beyond import div_ratio
    from recalign.eval.bootstrap import paired_permutation_test

    def metrics(lists):
        return {"div": div_ratio(lists, 1)}

    diverse = torch.arange(60).unsqueeze(1)               # 60 rows, 60 distinct items: DivRatio@1 = 1
    collapsed = torch.zeros(60, 1, dtype=torch.long)      # one item everywhere: DivRatio@1 = 1/60
    out = paired_permutation_test(diverse, collapsed, metrics, ["div"], n_permutations=200)["div"]
    assert out["diff"] == pytest.approx(1 - 1 / 60) and out["p_value"] == pytest.approx(1 / 201)
    same = paired_permutation_test(diverse, diverse.clone(), metrics, ["div"], n_permutations=200)["div"]
    assert same["diff"] == 0.0 and same["p_value"] == 1.0
