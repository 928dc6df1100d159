"""The synthetic source: seeded, and its planted structure (popularity, category taste, successors) is there."""

from __future__ import annotations

import time

import numpy as np
import pytest

from recalign.data.sources import prepare_source
from recalign.data.sources.synthetic import SyntheticSourceConfig, generate_synthetic
from recalign.errors import ConfigError

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


def _small(seed=3, **kw):
    return prepare_source("synthetic", None, n_users=200, n_items=60, seed=seed, **kw)


def test_same_seed_same_frames_different_seed_different():
    a, b, c = _small(3), _small(3), _small(4)
    assert a.interactions.equals(b.interactions) and a.items.equals(b.items) and a.users.equals(b.users)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not a.interactions.equals(c.interactions)


def test_defaults_are_demo_sized_and_fast():
    start = time.perf_counter()
    ds = prepare_source("synthetic", None)
    elapsed = time.perf_counter() - start
    lengths = ds.sequences().lengths()
    assert (ds.n_users, ds.n_items) == (1000, 300)
    assert lengths.min() >= 10 and lengths.max() <= 40
    assert elapsed < 10  # generation is vectorised over users
    # titles: adjective (i % 16), noun (i // 16 % 16), block number (i // 256 + 1); unique
    assert ds.titles()[12] == "Paper Ocean 1" and ds.titles()[16 * 3 + 1] == "Silent River 1"
    assert len(set(ds.titles())) == ds.n_items and all(len(c) == 1 for c in ds.item_categories())
    assert ds.info["source"] == "synthetic" and ds.info["options"]["seed"] == 0


def test_no_repeats_and_popularity_skew():
    ds = _small(popularity_skew=1.2)
    seqs = ds.sequences()
    assert all(len(set(seqs[u].tolist())) == len(seqs[u]) for u in range(ds.n_users))
    counts = np.sort(np.bincount(ds.interactions["item_id"], minlength=ds.n_items))[::-1]
    top_share = counts[: ds.n_items // 10].sum() / counts.sum()
    flat = _small(popularity_skew=0.0, follow_prob=0.0, category_affinity=0.5)
    flat_counts = np.sort(np.bincount(flat.interactions["item_id"], minlength=flat.n_items))[::-1]
    assert top_share > 1.5 * flat_counts[: flat.n_items // 10].sum() / flat_counts.sum()


def test_users_prefer_their_categories():
    def top_two_share(affinity):
        ds = prepare_source("synthetic", None, n_users=200, n_items=200, max_length=20, follow_prob=0.0,
                            category_affinity=affinity, seed=1)
        category = np.asarray([c[0] for c in ds.item_categories()])
        frame = ds.interactions.assign(category=category[ds.interactions["item_id"].to_numpy()])
        return frame.groupby("user_id")["category"].agg(lambda c: c.value_counts().iloc[:2].sum() / len(c)).mean()

    # 8 categories, 2 favourites: affinity 0.25 is no preference at all
    assert top_two_share(0.9) > top_two_share(0.25) + 0.25


def test_successor_dynamics_make_next_item_predictable():
    """A first-order transition counter beats popularity by far on each user's last item (what SASRec exploits)."""
    ds = _small(seed=5)
    seqs = ds.sequences()
    prev = np.concatenate([seqs[u][:-2] for u in range(ds.n_users)])
    nxt = np.concatenate([seqs[u][1:-1] for u in range(ds.n_users)])
    transitions = np.zeros((ds.n_items, ds.n_items))
    np.add.at(transitions, (prev, nxt), 1)
    popularity = np.bincount(np.concatenate([seqs[u][:-1] for u in range(ds.n_users)]), minlength=ds.n_items)
    hits_markov = hits_pop = 0
    for u in range(ds.n_users):
        history, target = seqs[u][:-1], seqs[u][-1]
        for scores, name in ((transitions[history[-1]].copy(), "markov"), (popularity.astype(float), "pop")):
            scores[history] = -1
            top = np.argsort(-scores, kind="stable")[:5]
            if target in top:
                if name == "markov":
                    hits_markov += 1
                else:
                    hits_pop += 1
    assert hits_markov > 2 * hits_pop and hits_markov / ds.n_users > 0.4


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="min_length"):
        generate_synthetic(SyntheticSourceConfig(min_length=20, max_length=10))
    with pytest.raises(ConfigError, match="max_length"):
        generate_synthetic(SyntheticSourceConfig(n_items=20, max_length=30))
    with pytest.raises(ConfigError, match="option 'n_users'"):
        prepare_source("synthetic", None, n_users="many")
