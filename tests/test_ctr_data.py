"""CTR impressions: labels, time-ordered history, user features, the seeded user split; knowledge files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recalign.methods.trackrec.ctr.data import build_impressions, split_users, to_batch
from recalign.methods.trackrec.ctr.knowledge import embed_texts, history_summaries, load_knowledge, write_knowledge
from recalign.data.dataset import build_dataset
from recalign.errors import ConfigError, DataError

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

ML1M_SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ml-1m-sample"

# items i1..i4 get dense ids 0..3 (item table order). Rows are given out of time order on purpose.
#   a: i1@10 (5*)  i2@20 (3*)  i3@20 (4*, same second as i2)  i4@30 (4*)
#   b: i2@5  (2*)  i1@15 (4*)
#   c: i3@1  (1*)  i4@2  (5*)            (c has no row in the user table: its features are missing)
ITEMS = pd.DataFrame({"item": ["i1", "i2", "i3", "i4"], "title": ["One", "Two", "Three", "Four"],
                      "categories": [["Drama"], ["Comedy"], ["Drama", "Comedy"], ["Horror"]]})
ROWS = pd.DataFrame([("a", "i4", 30, 4.0), ("b", "i1", 15, 4.0), ("a", "i2", 20, 3.0), ("a", "i1", 10, 5.0),
                     ("c", "i4", 2, 5.0), ("a", "i3", 20, 4.0), ("b", "i2", 5, 2.0), ("c", "i3", 1, 1.0)],
                    columns=["user", "item", "timestamp", "rating"])
USERS = pd.DataFrame({"user": ["a", "b"], "age": [24, 56], "gender": ["M", "F"], "occupation": ["writer", "other"]})


def _tiny():
    return build_dataset(ROWS, items=ITEMS, users=USERS, name="tiny-ctr", source="test")


def _rows(imps) -> list[tuple]:
    """(user original id, item title, label, history titles) per impression, for readable assertions."""
    ds = _tiny()
    users, titles = ds.users["original_id"].tolist(), ds.titles()
    return [(users[u], titles[i], int(y), [titles[h] for h in hist if h >= 0])
            for u, i, y, hist in zip(imps.user, imps.item, imps.label, imps.history)]


def test_history_holds_only_items_rated_before_and_labels_are_rating_at_least_4():
    imps = build_impressions(_tiny(), history_len=2, min_history=0)
    assert sorted(_rows(imps)) == sorted([
        ("a", "One", 1, []), ("a", "Two", 0, ["One"]),
        ("a", "Three", 1, ["One"]),            # i2 was rated in the same second: not "before"
        ("a", "Four", 1, ["Two", "Three"]),    # the last 2 of One, Two, Three
        ("b", "Two", 0, []), ("b", "One", 1, ["Two"]),
        ("c", "Three", 0, []), ("c", "Four", 1, ["Three"]),
    ])
    row = [r[:2] for r in _rows(imps)].index(("a", "Four"))
    assert imps.history[row].tolist() == [1, 2] and imps.history_rating[row].tolist() == [3.0, 4.0]
    row = [r[:2] for r in _rows(imps)].index(("b", "One"))
    assert imps.history[row].tolist() == [-1, 1] and imps.history_rating[row].tolist() == [0.0, 2.0]


def test_min_history_drops_rows_without_earlier_items():
    imps = build_impressions(_tiny(), history_len=2, min_history=1)
    assert sorted(r[:2] for r in _rows(imps)) == [("a", "Four"), ("a", "Three"), ("a", "Two"), ("b", "One"),
                                                  ("c", "Four")]


def test_user_features_are_codes_with_zero_for_missing():
    ds = _tiny()
    imps = build_impressions(ds, history_len=2, min_history=0)
    assert imps.feature_names == ("age", "gender", "occupation")
    assert imps.feature_sizes == (8, 3, 3)  # 7 age groups + missing; F/M + missing; other/writer + missing
    by_user = {ds.users["original_id"][u]: f.tolist() for u, f in zip(imps.user, imps.user_features)}
    # age 24 -> group 18-24 (code 2), 56 -> 56+ (code 7); gender F=1, M=2; occupation other=1, writer=2
    assert by_user == {"a": [2, 2, 2], "b": [7, 1, 1], "c": [0, 0, 0]}


def test_dataset_without_user_features_has_none():
    ds = build_dataset(ROWS, items=ITEMS, name="plain", source="test")
    imps = build_impressions(ds, history_len=3)
    assert imps.feature_names == () and imps.user_features.shape == (len(imps), 0)
    assert to_batch(imps)["features"].shape == (len(imps), 0)


def test_unrated_data_and_bad_settings_are_errors():
    unrated = build_dataset(ROWS.drop(columns="rating"), items=ITEMS, name="implicit", source="test")
    with pytest.raises(DataError, match="no ratings"):
        build_impressions(unrated)
    with pytest.raises(ConfigError, match="history_len"):
        build_impressions(_tiny(), history_len=0)
    with pytest.raises(ConfigError, match="fractions"):
        split_users(build_impressions(_tiny(), min_history=0), fractions=(0.5, 0.5))


def _many_users(n_users: int = 40):
    rows = [(f"u{u}", f"i{(u + t) % 7}", t, float(1 + (u + t) % 5)) for u in range(n_users) for t in range(4)]
    return build_dataset(pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"]), name="many",
                         source="test")


def test_user_split_is_seeded_disjoint_and_complete():
    imps = build_impressions(_many_users(), min_history=0)
    parts = split_users(imps, (0.5, 0.25, 0.25), seed=3)
    users = {name: set(imps.user[rows].tolist()) for name, rows in parts.items()}
    assert [len(users[n]) for n in ("train", "valid", "test")] == [20, 10, 10]
    assert not (users["train"] & users["valid"] or users["train"] & users["test"] or users["valid"] & users["test"])
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(imps)))  # every row, once
    again = split_users(imps, (0.5, 0.25, 0.25), seed=3)
    assert all(np.array_equal(parts[n], again[n]) for n in parts)
    other = split_users(imps, (0.5, 0.25, 0.25), seed=4)
    assert not np.array_equal(parts["test"], other["test"])


@pytest.mark.skipif(not ML1M_SAMPLE.is_dir(), reason="needs ../shared/data/ml-1m-sample")
def test_movielens_1m_sample_gives_impressions_with_user_features():
    from recalign.data.sources import prepare_source

    imps = build_impressions(prepare_source("movielens-1m", ML1M_SAMPLE))
    assert imps.feature_names == ("age", "gender", "occupation")
    assert (imps.user_features > 0).all()  # users.dat covers every user
    assert imps.feature_sizes[0] == 8 and imps.feature_sizes[1] == 3 and imps.feature_sizes[2] == 22
    assert 0.4 < imps.label.mean() < 0.7


def test_stand_in_summary_uses_only_the_history():
    ds = _tiny()
    imps = build_impressions(ds, history_len=2, min_history=0)
    texts = dict(zip(((ds.users["original_id"][u], ds.titles()[i]) for u, i in zip(imps.user, imps.item)),
                     history_summaries(imps, ds.titles(), ds.item_categories(), n_titles=1)))
    assert texts[("a", "Four")] == ("The user likes Comedy, Drama movies, dislikes no genre movies and rates "
                                    "moderately. Liked: Three. Disliked: Two.")
    assert texts[("a", "One")] == ("The user likes no genre yet movies, dislikes no genre movies and rates "
                                   "harshly. Liked: none. Disliked: none.")


def test_embeddings_are_cached_per_text(tmp_path):
    calls = []

    def encoder(texts):
        calls.append(list(texts))
        return np.array([[len(t), t.count("a")] for t in texts], dtype=np.float64)

    first = embed_texts(["aa", "b", "aa"], "fake", cache_dir=tmp_path, encoder=encoder)
    assert first.dtype == np.float32 and first.tolist() == [[2, 2], [1, 0], [2, 2]]
    second = embed_texts(["b", "cab"], "fake", cache_dir=tmp_path, encoder=encoder)
    assert second.tolist() == [[1, 0], [3, 1]]
    assert calls == [["aa", "b"], ["cab"]]  # "b" came from the cache


def test_knowledge_folder_round_trip_and_errors(tmp_path):
    encoder = lambda texts: np.array([[len(t), 1.0, 0.5] for t in texts])  # noqa: E731
    folder = write_knowledge(tmp_path / "k", ["p1", "prompt2"], ["c", "cot"], "fake", cache_dir=tmp_path / "cache",
                             encoder=encoder)
    knowledge = load_knowledge(folder, rows=2)
    assert knowledge.shape == (2, 2, 3) and knowledge.dtype == np.float32
    assert knowledge[:, 0, 0].tolist() == [2, 7] and knowledge[:, 1, 0].tolist() == [1, 3]
    with pytest.raises(DataError, match="one per impression"):
        load_knowledge(folder, rows=3)
    np.save(folder / "cot.npy", np.zeros((2, 3), dtype=np.float64))
    with pytest.raises(DataError, match="float32"):
        load_knowledge(folder)
    with pytest.raises(DataError, match="missing prompt.npy"):
        load_knowledge(tmp_path)
    with pytest.raises(DataError, match="2 prompts but 1 CoTs"):
        write_knowledge(tmp_path / "bad", ["p", "q"], ["c"], "fake", encoder=encoder)
    assert not (tmp_path / "bad").exists()
