"""MovieLens, S3-Rec and synthetic sources on tiny hand-made files."""

from __future__ import annotations

import numpy as np
import pytest

from recalign.data.sources import prepare_source
from recalign.errors import ConfigError, DataError


def _write_ml100k(folder, data_lines):
    folder.mkdir(exist_ok=True)
    (folder / "u.data").write_text("".join(data_lines))
    (folder / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\n\n")
    # latin-1 title, 3 genre flags
    (folder / "u.item").write_bytes(
        "1|Mis\xe9rables (1995)|01-Jan-1995||http://x|0|1|1\n2|Heat (1995)|01-Jan-1995||http://y|0|1|0\n"
        "3|Casino (1995)|01-Jan-1995||http://z|1|0|0\n".encode("latin-1"))


def test_movielens_100k_reads_ratings_titles_and_genres(tmp_path):
    _write_ml100k(tmp_path, ["7\t2\t5\t300\n", "7\t1\t3\t100\n", "9\t1\t4\t200\n"])
    ds = prepare_source("movielens-100k", tmp_path)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (2, 3, 3)
    assert ds.items["title"].tolist() == ["Mis\u00e9rables (1995)", "Heat (1995)", "Casino (1995)"]
    assert ds.item_categories() == [["Action", "Comedy"], ["Action"], ["unknown"]]
    # user "7" is dense 0; its sequence in time order is item "1" (t=100) then item "2" (t=300)
    assert ds.sequences()[0].tolist() == [0, 1]
    assert len(ds.info["raw_files"]) == 3 and all(len(h) == 64 for h in ds.info["raw_files"].values())
    assert len(prepare_source("movielens-100k", tmp_path, min_rating=4).interactions) == 2


@pytest.mark.parametrize("bad_line, field", [("7\tx\t5\t300\n", "item"), ("7\t2\n", "timestamp")])
def test_movielens_garbled_line_names_file_line_and_field(tmp_path, bad_line, field):
    _write_ml100k(tmp_path, ["7\t2\t5\t300\n", bad_line])
    with pytest.raises(DataError) as err:
        prepare_source("movielens-100k", tmp_path)
    assert "u.data:2" in str(err.value) and f"field '{field}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_movielens_1m_double_colon_format(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978300761\n2::10::4::978300000\n")
    (tmp_path / "movies.dat").write_bytes(b"10::Heat (1995)::Action|Crime\n20::Casino (1995)::Drama\n"
                                          b"30::Unrated (1999)::Comedy\n")
    ds = prepare_source("movielens-1m", tmp_path)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (2, 2, 3)  # unrated movie 30 is dropped
    assert ds.item_categories() == [["Action", "Crime"], ["Drama"]]


def test_s3rec_sequences_and_attributes(tmp_path):
    (tmp_path / "Toy.txt").write_text("1 5 3 5\n2 3 4\n")
    (tmp_path / "Toy_item2attributes.json").write_text('{"3": [7], "5": [1, 2]}')
    ds = prepare_source("s3rec", tmp_path, name="Toy")
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (2, 3, 5)
    assert ds.items["original_id"].tolist() == ["3", "4", "5"]
    assert ds.item_categories() == [["7"], [], ["1", "2"]]
    assert ds.sequences()[0].tolist() == [2, 0, 2]  # repeats kept in order
    (tmp_path / "Bad.txt").write_text("1 5 3\n2 3 x\n")
    with pytest.raises(DataError, match=r"Bad.txt:2, field 'item'"):
        prepare_source("s3rec", tmp_path / "Bad.txt")


def test_unknown_source_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="unknown source 'nope'"):
        prepare_source("nope", tmp_path)
    with pytest.raises(DataError, match="no such file"):
        prepare_source("movielens-100k", tmp_path / "missing")
    with pytest.raises(ConfigError, match="option 'n_users'"):
        prepare_source("synthetic", None, n_users="many")


def test_synthetic_is_seeded_and_structured():
    a = prepare_source("synthetic", None, n_users=200, n_items=60, seed=3)
    b = prepare_source("synthetic", None, n_users=200, n_items=60, seed=3)
    c = prepare_source("synthetic", None, n_users=200, n_items=60, seed=4)
    assert a.interactions.equals(b.interactions) and a.items.equals(b.items)
    assert not a.interactions.equals(c.interactions)
    seqs = a.sequences()
    lengths = seqs.lengths()
    assert lengths.min() >= 10 and lengths.max() <= 40
    # no user consumes an item twice
    assert all(len(set(seqs[u].tolist())) == len(seqs[u]) for u in range(a.n_users))
    # sequential structure: the most frequent successor of an item accounts for a large share of transitions
    prev = np.concatenate([seqs[u][:-1] for u in range(a.n_users)])
    nxt = np.concatenate([seqs[u][1:] for u in range(a.n_users)])
    pairs = prev * a.n_items + nxt
    counts = np.bincount(pairs, minlength=a.n_items ** 2).reshape(a.n_items, a.n_items)
    share_top = counts.max(1).sum() / counts.sum()
    assert share_top > 0.4
