"""Splits, k-core filtering and negative sampling on small hand-made frames."""

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.data.dataset import UserSequences, build_dataset
from recalign.data.sampling import (candidate_lists, load_candidates, sample_negatives, save_candidates)
from recalign.data.split import global_temporal_split, kcore_filter, leave_one_out_split, random_split
from recalign.errors import ConfigError, DataError

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


def make(rows, items=None):
    """Dataset from (user, item, timestamp) rows with original ids."""
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    return build_dataset(frame, items=items, name="t", source="test")


def as_rows(dataset, frame):
    """A part as a list of (user original id, item original id, timestamp), in frame order."""
    users = dataset.users["original_id"].to_numpy()
    items = dataset.items["original_id"].to_numpy()
    return [(users[u], items[i], int(t)) for u, i, t in
            zip(frame["user_id"], frame["item_id"], frame["timestamp"])]


# ---- leave-one-out ------------------------------------------------------------------------------------

def test_leave_one_out_exact_rows_ties_and_short_users():
    ds = make([
        ("a", "x1", 5), ("a", "x2", 1), ("a", "x3", 3), ("a", "x4", 3),  # x3/x4 tie: file order x3 then x4
        ("b", "x1", 7), ("b", "x2", 8),                                   # 2 interactions: all train
        ("c", "x2", 2), ("c", "x3", 1), ("c", "x1", 9),                   # exactly 3: one per part
    ])
    split = leave_one_out_split(ds)
    # a sorted: x2(1), x3(3), x4(3), x1(5) -> test x1, valid x4 (the later of the tie), train x2, x3
    assert as_rows(ds, split.test) == [("a", "x1", 5), ("c", "x1", 9)]
    assert as_rows(ds, split.valid) == [("a", "x4", 3), ("c", "x2", 2)]
    assert as_rows(ds, split.train) == [("a", "x2", 1), ("a", "x3", 3), ("b", "x1", 7), ("b", "x2", 8),
                                        ("c", "x3", 1)]
    assert split.info["users_all_in_train"] == 1
    assert len(split.history("valid")) == 5              # train only
    assert len(split.history("test")) == 5 + 2           # train + valid
    assert len(split.history("train")) == 0


# ---- global temporal ----------------------------------------------------------------------------------

def test_global_temporal_cut_never_separates_equal_timestamps():
    # 10 interactions; fractions 0.6/0.1/0.1/0.2 -> nominal cuts after rows 6, 7, 8 of the time order.
    rows = [("u1", "i1", 1), ("u2", "i2", 2), ("u1", "i3", 3), ("u2", "i1", 4), ("u1", "i2", 5),
            ("u2", "i3", 6), ("u1", "i4", 6),  # rows 6 and 7 share t=6: the 6-cut moves to 7
            ("u2", "i4", 8), ("u3", "i1", 9), ("u1", "i5", 10)]
    ds = make(rows)
    split = global_temporal_split(ds, fractions=(0.6, 0.1, 0.1, 0.2))
    # train = t<=6 (7 rows); train2: the 7-cut is already reached -> empty; valid = t=8; test = t=9, 10
    assert as_rows(ds, split.train) == rows[:7]
    assert as_rows(ds, split.extra["train2"]) == []
    assert as_rows(ds, split.valid) == [("u2", "i4", 8)]
    assert as_rows(ds, split.test) == [("u3", "i1", 9), ("u1", "i5", 10)]
    assert split.info["cut_timestamps"] == [6, 6, 8]
    # u3 and i5 first appear in test; i4 is in train so valid has nothing new
    assert split.info["new_in_part"]["test"] == {"users": 1, "items": 1}
    assert split.info["new_in_part"]["valid"] == {"users": 0, "items": 0}
    assert len(split.history("test")) == 8  # train + train2 + valid
    assert len(split.history("valid")) == 7


def test_global_temporal_is_stable_and_exact_without_ties():
    rows = [("u1", f"i{t}", t) for t in (5, 1, 4, 2, 3, 10, 9, 8, 7, 6)]
    ds = make(rows)
    split = global_temporal_split(ds)
    ts = lambda f: f["timestamp"].tolist()  # noqa: E731
    assert ts(split.train) == [1, 2, 3, 4, 5, 6]
    assert ts(split.extra["train2"]) == [7]
    assert ts(split.valid) == [8]
    assert ts(split.test) == [9, 10]


def test_global_temporal_rejects_bad_fractions():
    ds = make([("u", "i", 1)])
    with pytest.raises(ConfigError):
        global_temporal_split(ds, fractions=(0.5, 0.5))
    with pytest.raises(ConfigError):
        global_temporal_split(ds, fractions=(0.6, 0.1, 0.1, 0.3))


# ---- random -------------------------------------------------------------------------------------------

def test_random_split_partitions_and_is_seeded():
    rows = [(f"u{i % 7}", f"i{i % 11}", i) for i in range(100)]
    ds = make(rows)
    a = random_split(ds, fractions=(0.8, 0.1, 0.1), seed=3)
    b = random_split(ds, fractions=(0.8, 0.1, 0.1), seed=3)
    c = random_split(ds, fractions=(0.8, 0.1, 0.1), seed=4)
    assert (len(a.train), len(a.valid), len(a.test)) == (80, 10, 10)
    # timestamps are unique here, so they identify rows: the three parts partition the data
    parts = [set(p["timestamp"]) for p in (a.train, a.valid, a.test)]
    assert set().union(*parts) == set(range(100)) and sum(map(len, parts)) == 100
    assert a.test.equals(b.test) and not a.test.equals(c.test)
    assert a.train["timestamp"].is_monotonic_increasing  # rows keep dataset order


# ---- k-core -------------------------------------------------------------------------------------------

def test_kcore_hand_example_keeps_metadata_and_reindexes():
    items = pd.DataFrame({"item": ["x", "y", "z", "w"], "title": ["X", "Y", "Z", "W"],
                          "categories": [["g1"], ["g2"], ["g3"], []]})
    ds = make([("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("b", "x", 4), ("b", "y", 5), ("c", "x", 6)],
              items=items)
    core = kcore_filter(ds, 2, 2)
    # round 1: user c (1 interaction), items z (1) and w (0) go; then a={x,y}, b={x,y}, x={a,b}, y={a,b}: fixed
    assert core.n_users == 2 and core.n_items == 2 and len(core.interactions) == 4
    assert core.items["title"].tolist() == ["X", "Y"]
    assert core.items["categories"].tolist() == [["g1"], ["g2"]]
    assert core.items["item_id"].tolist() == [0, 1]
    assert sorted(core.interactions["user_id"].unique().tolist()) == [0, 1]
    assert core.users["original_id"].tolist() == ["a", "b"]
    assert core.info["kcore"]["removed_interactions"] == 2


def _kcore_reference(pairs, k_user, k_item):
    """Plain-Python k-core: remove under-threshold users/items until nothing changes."""
    pairs = list(pairs)
    while True:
        uc, ic = {}, {}
        for u, i in pairs:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        kept = [(u, i) for u, i in pairs if uc[u] >= k_user and ic[i] >= k_item]
        if len(kept) == len(pairs):
            return kept
        pairs = kept


def test_kcore_matches_iterated_reference():
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{i}", t) for t, (u, i) in
            enumerate(zip(rng.integers(0, 60, 400), rng.zipf(1.6, 400) % 80))]
    ds = make(rows)
    core = kcore_filter(ds, 5, 4)
    expected = _kcore_reference([(u, i) for u, i, _ in rows], 5, 4)
    users = core.users["original_id"].to_numpy()
    items = core.items["original_id"].to_numpy()
    got = [(users[u], items[i]) for u, i in zip(core.interactions["user_id"], core.interactions["item_id"])]
    assert got == expected and len(got) > 0
    assert core.info["kcore"]["iterations"] >= 2


# ---- negatives ----------------------------------------------------------------------------------------

def _history(lists, n_items):
    frame = pd.DataFrame([(u, i, t) for u, items in enumerate(lists) for t, i in enumerate(items)],
                         columns=["user_id", "item_id", "timestamp"])
    return UserSequences.from_interactions(frame, len(lists), n_items)


def test_negatives_never_in_history_distinct_and_seeded():
    rng = np.random.default_rng(1)
    lists = [rng.choice(50, size=rng.integers(0, 40), replace=False).tolist() for _ in range(300)]
    history = _history(lists, 50)
    users = np.arange(300)
    neg = sample_negatives(50, history, users, 10, seed=7)
    assert neg.shape == (300, 10) and neg.dtype == torch.long
    for u in range(300):
        row = neg[u].tolist()
        assert len(set(row)) == 10
        assert not set(row) & set(lists[u])
        assert all(0 <= i < 50 for i in row)
    assert torch.equal(neg, sample_negatives(50, history, users, 10, seed=7))
    assert not torch.equal(neg, sample_negatives(50, history, users, 10, seed=8))


def test_negatives_when_few_items_are_left_and_error_when_too_few():
    history = _history([[0, 1, 2, 3, 4, 5, 6], [0]], 10)
    neg = sample_negatives(10, history, [0, 1], 3, seed=0)
    assert sorted(neg[0].tolist()) == [7, 8, 9]  # the only 3 items user 0 never touched
    assert len(set(neg[1].tolist())) == 3 and 0 not in neg[1].tolist()
    with pytest.raises(DataError):
        sample_negatives(10, history, [0], 4, seed=0)


def test_negatives_are_uniform_over_allowed_items():
    # 3000 users with history {0, 1} over 12 items, 3 negatives each: every item 2..11 has p = 3/10.
    history = _history([[0, 1]] * 3000, 12)
    neg = sample_negatives(12, history, np.arange(3000), 3, seed=0)
    counts = torch.bincount(neg.flatten(), minlength=12)
    assert counts[:2].sum() == 0
    # expected 900 each, sd = sqrt(3000 * 0.3 * 0.7) ~ 25; 120 is ~4.8 sd
    assert (counts[2:] - 900).abs().max() < 120


def test_candidate_lists_target_first_and_saved_with_seed(tmp_path):
    history = _history([[1, 2], [3]], 20)
    cands = candidate_lists(20, history, [0, 1], torch.tensor([5, 6]), 8, seed=2)
    assert cands.shape == (2, 9) and cands[:, 0].tolist() == [5, 6]
    assert 5 not in cands[0, 1:].tolist() and 6 not in cands[1, 1:].tolist()  # target excluded too
    path = save_candidates(tmp_path / "cands.pt", torch.tensor([0, 1]), cands, seed=2)
    users, loaded, seed = load_candidates(path)
    assert torch.equal(loaded, cands) and users.tolist() == [0, 1] and seed == 2


def test_sample_negatives_from_dataset_excludes_every_interaction():
    ds = make([("a", "x", 1), ("a", "y", 2), ("b", "z", 1)] + [("c", f"n{j}", j) for j in range(10)])
    neg = sample_negatives(ds, None, [0, 1], 5, seed=0)  # history = the whole dataset
    assert not set(neg[0].tolist()) & {0, 1} and 2 not in neg[1].tolist()
