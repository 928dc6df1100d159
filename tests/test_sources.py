"""Every raw-format source on tiny hand-made files: counts, titles, categories, order, and bad input."""

from __future__ import annotations

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


# ---- Amazon ----------------------------------------------------------------------------------------------

def _write_jsonl(path, records, opener=open):
    import json

    with opener(path, "wt") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def test_amazon2014_gz_reviews_and_literal_metadata(tmp_path):
    _write_jsonl(tmp_path / "reviews_Toy_5.json.gz", [
        {"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": 300, "reviewText": "ok"},
        {"reviewerID": "A2", "asin": "B2", "overall": 2.0, "unixReviewTime": 100},
        {"reviewerID": "A1", "asin": "B2", "overall": 4.0, "unixReviewTime": 200},
    ], opener=gzip.open)
    _write_jsonl(tmp_path / "meta_Toy.json", [
        repr({"asin": "B9", "title": "Not reviewed"}),
        repr({"asin": "B2", "title": "Rose &amp; Oud Soap", "categories": [["Beauty", "Bath", "Soap"],
                                                                           ["Beauty", "Gifts"]], "brand": "Q"}),
    ])
    ds = prepare_source("amazon2014", tmp_path)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (2, 2, 3)
    assert ds.items["original_id"].tolist() == ["B1", "B2"]  # reviewed items only, first appearance order
    assert ds.titles() == ["", "Rose & Oud Soap"]
    assert ds.item_categories() == [[], ["Bath", "Soap", "Gifts"]]  # root department dropped
    assert ds.items["text"][1] == "Rose & Oud Soap. Bath, Soap, Gifts. Q."
    assert ds.sequences()[0].tolist() == [1, 0]  # A1: B2 at t=200, then B1 at t=300
    assert set(ds.info["raw_files"]) == {"reviews_Toy_5.json.gz", "meta_Toy.json"}
    assert len(prepare_source("amazon2014", tmp_path, min_rating=4).interactions) == 2


def test_amazon2018_json_metadata_and_duplicates(tmp_path):
    review = {"reviewerID": "U", "asin": "X", "overall": 5.0, "unixReviewTime": 10, "verified": True}
    _write_jsonl(tmp_path / "Toy_5.json", [review, review, {**review, "asin": "Y", "unixReviewTime": 5}])
    _write_jsonl(tmp_path / "meta_Toy.json", [{"asin": "Y", "title": "Yo-yo", "category": ["Toys", "Classic"]}])
    ds = prepare_source("amazon2018", tmp_path / "Toy_5.json", meta="meta_Toy.json")
    assert len(ds.interactions) == 2 and ds.info["duplicates_dropped"] == 1
    assert ds.titles() == ["", "Yo-yo"] and ds.item_categories() == [[], ["Classic"]]
    assert len(prepare_source("amazon2018", tmp_path / "Toy_5.json", drop_duplicates=False).interactions) == 3


@pytest.mark.parametrize("line, where", [
    ('{"reviewerID": "B", "overall": 1, "unixReviewTime": 2}', "bad.json:2, field 'asin': missing field"),
    ('{"reviewerID": "B", "asin": "X", "overall": 1, ', "bad.json:2: invalid JSON"),
    ('{"reviewerID": "B", "asin": "X", "overall": "high", "unixReviewTime": 2}', "bad.json:2, field 'overall'"),
])
def test_amazon_bad_record_names_file_line_and_field(tmp_path, line, where):
    _write_jsonl(tmp_path / "bad.json", [{"reviewerID": "A", "asin": "X", "overall": 5, "unixReviewTime": 1}, line])
    with pytest.raises(DataError) as err:
        prepare_source("amazon2018", tmp_path / "bad.json")
    assert where in str(err.value) and "\n" not in str(err.value)


# ---- UniSRec ---------------------------------------------------------------------------------------------

def _write_unisrec(folder, test_rows):
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (folder / "Toy.item2index").write_text("P0\t0\nP1\t1\nP2\t2\nP3\t3\n")
    (folder / "Toy.user2index").write_text("R0\t0\nR1\t1\n")
    (folder / "Toy.text").write_text("item_id:token\ttext:token_seq\n"
                                     "P0\tAlpha Saw. Tools Saws. Acme. \nP1\t24 Oz. Bottle. Lab Glass. Corex. \n"
                                     "P2\tGloves. Safety. \nP3\tTape. Tapes. TapeCo. \n")
    # user 0: full sequence 3 1 0 2 (train prefixes written latest first); user 1: 2 3 1 0
    (folder / "Toy.train.inter").write_text(header + "0\t3\t1\n1\t2 3\t1\n1\t2\t3\n")
    (folder / "Toy.valid.inter").write_text(header + "0\t3 1\t0\n1\t2 3 1\t0\n")
    (folder / "Toy.test.inter").write_text(header + "".join(test_rows))


def test_unisrec_rebuilds_sequences_in_index_order(tmp_path):
    _write_unisrec(tmp_path, ["0\t3 1 0\t2\n", "1\t2 3 1 0\t2\n"])
    ds = prepare_source("unisrec", tmp_path)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (2, 4, 9)
    assert ds.items["original_id"].tolist() == ["P0", "P1", "P2", "P3"]  # dense id = item2index index
    assert ds.users["original_id"].tolist() == ["R0", "R1"]
    assert ds.sequences()[0].tolist() == [3, 1, 0, 2] and ds.sequences()[1].tolist() == [2, 3, 1, 0, 2]
    assert ds.titles() == ["Alpha Saw", "24 Oz. Bottle", "Gloves", "Tape"]
    assert ds.items["text"][0].startswith("Alpha Saw. Tools Saws.")
    assert prepare_source("unisrec", tmp_path / "Toy.text").n_users == 2  # any file of the set works
    # without train/valid files the test rows alone give history + target
    (tmp_path / "Toy.train.inter").unlink()
    only_test = prepare_source("unisrec", tmp_path, name="Toy")
    assert only_test.sequences()[0].tolist() == [3, 1, 0, 2] and len(only_test.interactions) == 9
    assert "Toy.train.inter" not in only_test.info["raw_files"]


def test_unisrec_inconsistent_test_row_is_an_error(tmp_path):
    _write_unisrec(tmp_path, ["0\t3 1 0\t2\n", "1\t2 3 2 0\t2\n"])  # user 1's history disagrees with train/valid
    with pytest.raises(DataError, match=r"Toy.test.inter:3, field 'item_id_list'"):
        prepare_source("unisrec", tmp_path)


# ---- SPRec Goodreads -------------------------------------------------------------------------------------

def _write_goodreads(folder, records):
    import json

    (folder / "eval" / "Goodreads").mkdir(parents=True)
    (folder / "data" / "Goodreads").mkdir(parents=True)
    catalog = {"0": "Dune", "1": 'A Boy Called "It"', "2": "Emma, Again", "3": "Unread"}
    (folder / "eval" / "Goodreads" / "id2name.json").write_text(json.dumps(catalog))
    (folder / "eval" / "Goodreads" / "name2genre.json").write_text(json.dumps(
        {"Dune": ["fiction", "fantasy, paranormal"], 'A Boy Called "It"': ["non-fiction"], "Emma, Again": []}))
    (folder / "data" / "Goodreads" / "train.json").write_text(json.dumps(records))


def _record(history, target):
    titles = ", ".join(f'"{t}"' for t in history)
    return {"instruction": "Recommend a book.", "input": f"The user has read: {titles}, please write a new book",
            "output": f'"{target}"\n'}


def test_goodreads_records_become_users(tmp_path):
    _write_goodreads(tmp_path, [_record(["Dune", 'A Boy Called "It"'], "Emma, Again"),
                                _record(["Emma, Again", "Lost Book"], "Dune")])
    ds = prepare_source("goodreads-sprec", tmp_path)
    assert ds.titles() == ["Dune", 'A Boy Called "It"', "Emma, Again", "Unread"]
    assert ds.item_categories()[0] == ["fiction", "fantasy, paranormal"]
    assert ds.users["original_id"].tolist() == ["data/Goodreads/train.json:0", "data/Goodreads/train.json:1"]
    assert ds.sequences()[0].tolist() == [0, 1, 2] and ds.sequences()[1].tolist() == [2, 0]
    assert ds.info["unknown_titles"] == 1 and ds.info["unknown_title_examples"] == ["Lost Book"]
    assert ds.info["records"] == {"data/Goodreads/train.json": 2}
    added = prepare_source("goodreads-sprec", tmp_path, unknown_titles="add")
    assert added.n_items == 5 and added.sequences()[1].tolist() == [2, 4, 0]


def test_goodreads_record_missing_field(tmp_path):
    _write_goodreads(tmp_path, [_record(["Dune"], "Emma, Again"), {"instruction": "x", "input": '"Dune"'}])
    with pytest.raises(DataError) as err:
        prepare_source("goodreads-sprec", tmp_path)
    assert "train.json" in str(err.value) and "record 1" in str(err.value) and "field 'output'" in str(err.value)
    with pytest.raises(ConfigError, match="option 'files'"):
        prepare_source("goodreads-sprec", tmp_path, files="train.json")


# ---- seed pickle formats ---------------------------------------------------------------------------------

def test_reclmgen_pickles_and_json(tmp_path):
    import json
    import pickle

    sequential = {"u1": ["10", "30", "20"], "u2": ["20", "10"]}
    meta = {"10": {"title": "Heat", "year": 1995}, "20": {"title": "Up"}, "30": {"title": "Ran"}}
    category = {"Action": ["10", "30"], "Family": ["20"], "Drama": ["30"]}
    for name, value in (("sequential", sequential), ("meta", meta), ("category", category)):
        (tmp_path / f"{name}.pickle").write_bytes(pickle.dumps(value))
    ds = prepare_source("reclmgen-pickle", tmp_path)
    assert ds.titles() == ["Heat", "Up", "Ran"] and ds.items["text"][0] == "Heat. year: 1995"
    assert ds.item_categories() == [["Action"], ["Family"], ["Action", "Drama"]]
    assert ds.sequences()[0].tolist() == [0, 2, 1] and ds.info["ranking_candidates"] == 0
    as_json = tmp_path / "json"
    as_json.mkdir()
    for name, value in (("sequential", sequential), ("meta", meta), ("category", category)):
        (as_json / f"{name}.json").write_text(json.dumps(value))
    assert prepare_source("reclmgen-pickle", as_json).interactions.equals(ds.interactions)


def test_recgpt_pickle_and_refused_callable(tmp_path):
    import os
    import pickle

    (tmp_path / "test.pkl").write_bytes(pickle.dumps({6: [5, 1, 5, 3], 22: [1, 3]}))
    ds = prepare_source("recgpt-pickle", tmp_path)
    assert ds.items["original_id"].tolist() == ["1", "3", "5"]  # sorted by integer id
    assert ds.users["original_id"].tolist() == ["6", "22"]
    assert ds.sequences()[0].tolist() == [2, 0, 2, 1] and len(ds.interactions) == 6

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / "cold_test.pkl").write_bytes(pickle.dumps({1: [Evil()]}))
    with pytest.raises(DataError) as err:
        prepare_source("recgpt-pickle", tmp_path, file="cold_test")
    assert "cold_test.pkl" in str(err.value) and "refuses global" in str(err.value)
    (tmp_path / "odd.pkl").write_bytes(pickle.dumps({1: [1.5]}))
    with pytest.raises(DataError, match="user 1: item ids must be int or str, got float"):
        prepare_source("recgpt-pickle", tmp_path / "odd.pkl")


def test_shared_fixtures_match_their_description(tiny_dataset, synthetic_dataset):
    seqs = tiny_dataset.sequences()
    assert [seqs[u].tolist() for u in range(3)] == [[0, 1, 2, 3], [1, 2, 4], [0, 2, 3, 4]]
    assert tiny_dataset.users["original_id"].tolist() == ["alice", "bob", "carol"]
    assert sorted(tiny_dataset.category_index()) == ["Mystery", "Romance"]
    assert (synthetic_dataset.n_users, synthetic_dataset.n_items) == (200, 60)
    assert synthetic_dataset.sequences().lengths().max() <= 20


# ---- issue 9: robust raw input (each test failed before the fix) ---------------------------------------------

import gzip  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")
REVIEW = {"reviewerID": "U", "asin": "X", "overall": 5.0, "unixReviewTime": 10}


@pytest.mark.parametrize("source", ["amazon2014", "amazon2018"])
def test_amazon_non_utf8_review_is_a_data_error_naming_file_and_line(tmp_path, source):
    path = tmp_path / "Toy_5.json"
    path.write_bytes(json.dumps(REVIEW).encode() + b"\n" + b'{"reviewerID": "\xff\xfe", "asin": "Y"}\n')
    with pytest.raises(DataError) as err:
        prepare_source(source, path)
    assert "Toy_5.json:2" in str(err.value) and "not utf-8 text" in str(err.value)


def test_amazon_binary_gz_that_is_not_gzip(tmp_path):
    (tmp_path / "Toy_5.json.gz").write_text(json.dumps(REVIEW) + "\n")
    with pytest.raises(DataError, match=r"Toy_5\.json\.gz: named \.gz but not gzip-compressed"):
        prepare_source("amazon2014", tmp_path / "Toy_5.json.gz")


def test_s3rec_repeated_user_line_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "Seq.txt").write_text("1 10 11\n2 10\n1 14\n")
    with pytest.raises(DataError) as err:
        prepare_source("s3rec", tmp_path / "Seq.txt")
    assert "Seq.txt:3" in str(err.value) and "user 1 already has a line (line 1)" in str(err.value)


@pytest.mark.parametrize("text", ["1 10\n2 11\n3 10\n", "1\t10\t5\n2\t11\t3\n"])
def test_s3rec_refuses_a_play_count_table(tmp_path, text):
    (tmp_path / "plays.txt").write_text(text)
    with pytest.raises(DataError, match="tabular source"):
        prepare_source("s3rec", tmp_path / "plays.txt")


def test_empty_u_data_is_an_error_not_a_zero_user_dataset(tmp_path):
    _write_ml100k(tmp_path, [])
    with pytest.raises(DataError, match=r"u\.data: no interactions"):
        prepare_source("movielens-100k", tmp_path)


def test_min_rating_that_removes_every_row_is_an_error(tmp_path):
    _write_ml100k(tmp_path, ["7\t2\t3\t300\n"])
    with pytest.raises(DataError, match="no interactions"):
        prepare_source("movielens-100k", tmp_path, min_rating=4)


@pytest.mark.parametrize("line, field", [("-7\t2\t5\t300\n", "user"), ("7\t99999999999999999999\t5\t300\n", "item"),
                                         ("7\t2.5\t5\t300\n", "item")])
def test_negative_huge_or_fractional_ids_name_file_line_and_field(tmp_path, line, field):
    _write_ml100k(tmp_path, ["7\t2\t5\t300\n", line])
    with pytest.raises(DataError) as err:
        prepare_source("movielens-100k", tmp_path)
    assert "u.data:2" in str(err.value) and f"field '{field}'" in str(err.value) and "0..2^63-1" in str(err.value)


@pytest.mark.parametrize("text, message", [("2 -10 11\n", "Seq.txt:2, field 'item': expected integer ids >= 0"),
                                           ("2 10\n3 99999999999999999999\n", "Seq.txt:3, field 'item': id 9")])
def test_s3rec_negative_and_huge_ids(tmp_path, text, message):
    (tmp_path / "Seq.txt").write_text("1 4 5\n" + text)
    with pytest.raises(DataError) as err:
        prepare_source("s3rec", tmp_path / "Seq.txt")
    assert message in str(err.value)


def test_recgpt_negative_item_id(tmp_path):
    (tmp_path / "test.pkl").write_bytes(pickle.dumps({1: [3, -4]}))
    with pytest.raises(DataError, match=r"user 1: integer item ids must be in 0\.\.2\^63-1, got -4"):
        prepare_source("recgpt-pickle", tmp_path)


def test_duplicated_rows_are_dropped_with_a_warning_in_the_stats(tmp_path):
    _write_ml100k(tmp_path, ["7\t2\t5\t300\n", "7\t1\t3\t100\n", "7\t2\t5\t300\n", "7\t2\t5\t300\n"])
    ds = prepare_source("movielens-100k", tmp_path)
    assert len(ds.interactions) == 2
    assert ds.stats()["warnings"] == ["dropped 2 duplicated rows (same user, item, timestamp and rating)"]
    ds.save(tmp_path / "out")
    from recalign.data.dataset import Dataset
    assert Dataset.load(tmp_path / "out").stats()["warnings"] == ds.stats()["warnings"]


def test_goodreads_without_genres_is_an_error_or_a_warning(tmp_path):
    _write_goodreads(tmp_path, [_record(["Dune"], "Emma, Again")])
    (tmp_path / "eval" / "Goodreads" / "name2genre.json").unlink()
    with pytest.raises(DataError, match=r"name2genre\.json: missing file name2genre\.json"):
        prepare_source("goodreads-sprec", tmp_path)
    ds = prepare_source("goodreads-sprec", tmp_path, require_genres=False)
    assert ds.stats()["categories"] == 0
    assert ds.stats()["warnings"] == ["name2genre.json not found: items have no categories"]


@pytest.mark.parametrize("source, name", [("recgpt-pickle", "test.pkl"), ("s3rec", "Seq.txt"),
                                          ("reclmgen-pickle", "sequential.json"), ("tabular", "plays.csv"),
                                          ("tabular", "plays.parquet"), ("amazon2014", "Toy_5.json.gz"),
                                          ("amazon2018", "Toy_5.json")])
def test_git_lfs_pointer_is_named_as_such(tmp_path, source, name):
    (tmp_path / name).write_text(LFS_POINTER)
    with pytest.raises(DataError) as err:
        prepare_source(source, tmp_path / name)
    assert f"{name}: this is a Git LFS pointer" in str(err.value) and "git lfs pull" in str(err.value)


def test_missing_raw_path_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError) as err:
        prepare_source("movielens-100k", tmp_path / "ml-100k")
    assert "recalign data download movielens-100k --out DIR" in str(err.value)
    with pytest.raises(DataError, match="no download is built in for 'p5-text'.*TransRec"):
        prepare_source("p5-text", tmp_path / "beauty")


# ---- issue 9: new sources ----------------------------------------------------------------------------------

def test_tabular_play_counts_with_header_and_item_table(tmp_path):
    (tmp_path / "plays.tsv").write_text("user_id\tartist_id\tplays\nu1\ta2\t5\nu1\ta1\t2\nu2\ta2\t7\n")
    (tmp_path / "artists.csv").write_text('id,name,tags\na1,"Abba, The",pop|disco\na2,Muse,rock\n')
    ds = prepare_source("tabular", tmp_path / "plays.tsv", user="user_id", item="artist_id", rating="plays",
                        items="artists.csv", item_key="id", item_title="name", item_categories="tags",
                        categories_sep="|")
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (2, 2, 3)
    assert ds.items["original_id"].tolist() == ["a1", "a2"] and ds.titles() == ["Abba, The", "Muse"]
    assert ds.item_categories() == [["pop", "disco"], ["rock"]]
    assert ds.interactions["rating"].tolist() == [5.0, 2.0, 7.0]
    assert ds.sequences()[0].tolist() == [1, 0]  # file order without a timestamp column
    assert len(prepare_source("tabular", tmp_path / "plays.tsv", item="artist_id", rating="plays",
                              min_rating=5).interactions) == 2


def test_tabular_recbole_inter_headers_parquet_and_no_header(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                      "1\t9\t4\t20\n1\t8\t5\t10\n")
    ds = prepare_source("tabular", tmp_path / "x.inter")
    assert ds.sequences()[0].tolist() == [1, 0]  # ordered by the timestamp column found by name
    assert ds.items["original_id"].tolist() == ["9", "8"]
    pd.DataFrame({"u": ["a", "b"], "i": [1, 2]}).to_parquet(tmp_path / "t.parquet")
    assert prepare_source("tabular", tmp_path / "t.parquet", user="u", item="i").n_users == 2
    (tmp_path / "n.csv").write_text("a;1\nb;2\na;3\n")
    ds = prepare_source("tabular", tmp_path / "n.csv", header=False, sep="semicolon", user="0", item="1")
    assert (ds.n_users, ds.n_items) == (2, 3)


def test_tabular_wrong_separator_names_the_columns_it_saw(tmp_path):
    (tmp_path / "plays.csv").write_text("user_id\titem_id\n1\t2\n")
    with pytest.raises(DataError, match=r"plays\.csv, field 'user': no column 'user_id' \(columns: 'user_id\\titem_id'\)"):
        prepare_source("tabular", tmp_path / "plays.csv")


def _write_p5(folder):
    folder.mkdir()
    (folder / "sequential_data.txt").write_text("1 2 0\n2 1\n")
    np.save(folder / "title_maps.npy", np.array({"id2title": {"0": "Lipstick", "1": "Soap", "2": "Comb"}},
                                                dtype=object), allow_pickle=True)
    np.save(folder / "category_map.npy", np.array({"id2category": {"0": [["Beauty", "Makeup", "Lips"]],
                                                                   "1": [["Beauty", "Bath"]], "2": [["Beauty"]]}},
                                                  dtype=object), allow_pickle=True)


def test_p5_text_maps_through_the_restricted_loader(tmp_path):
    _write_p5(tmp_path / "beauty")
    ds = prepare_source("p5-text", tmp_path / "beauty")
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (2, 3, 3)
    assert ds.titles() == ["Lipstick", "Soap", "Comb"]
    assert ds.item_categories() == [["Makeup", "Lips"], ["Bath"], ["Beauty"]]
    assert ds.sequences()[0].tolist() == [2, 0] and ds.name == "beauty"


def test_p5_npy_with_a_callable_is_refused(tmp_path):
    _write_p5(tmp_path / "beauty")

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))
    np.save(tmp_path / "beauty" / "title_maps.npy", np.array({"id2title": Evil()}, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"title_maps\.npy: restricted unpickler refuses global '(posix|os|nt)\.system'"):
        prepare_source("p5-text", tmp_path / "beauty")


def test_lcrec_items_and_sequences(tmp_path):
    (tmp_path / "Office.item.json").write_text(json.dumps({
        "1": {"title": "Pen", "description": "", "brand": "Bic", "categories": "Office, Writing, Pens"},
        "0": {"title": "Phone", "description": "Rings.", "brand": "", "categories": "Office, Electronics"}}))
    (tmp_path / "Office.inter.json").write_text(json.dumps({"0": [1, 0], "1": [1]}))
    ds = prepare_source("lcrec", tmp_path)
    assert ds.titles() == ["Phone", "Pen"] and ds.item_categories()[1] == ["Office", "Writing", "Pens"]
    assert ds.items["text"].tolist() == ["Phone. Rings..", "Pen. Bic."]
    assert ds.sequences()[0].tolist() == [1, 0] and (ds.n_users, len(ds.interactions)) == (2, 3)


def test_recbole_history_target_rows_and_item_file(tmp_path):
    (tmp_path / "G.item").write_text("item_id:token\ttitle:token_seq\n0\tZelda\n1\tMario\n2\tTetris\n")
    (tmp_path / "G-6k.test.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n"
                                              "0\t0 1\t2\n1\t2\t0\n")
    ds = prepare_source("recbole", tmp_path)
    assert ds.titles() == ["Zelda", "Mario", "Tetris"] and ds.name == "G-6k"
    assert ds.sequences()[0].tolist() == [0, 1, 2] and ds.sequences()[1].tolist() == [2, 0]
    (tmp_path / "G-6k.test.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n"
                                              "0\t0 1\t2\n0\t2\t0\n")
    with pytest.raises(DataError, match=r"G-6k\.test\.inter:3, field 'user_id': user 0 has a second row"):
        prepare_source("recbole", tmp_path)


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_movielens_1m_movies_in_either_encoding_and_user_features(tmp_path, encoding):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n2::10::3::978300761\n")
    (tmp_path / "movies.dat").write_bytes("10::Misérables, Les (1995)::Drama|Musical\n".encode(encoding))
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    ds = prepare_source("movielens-1m", tmp_path)
    assert ds.titles() == ["Misérables, Les (1995)"]
    assert ds.users[["original_id", "gender", "age", "occupation"]].values.tolist() == [["1", "F", 1, 10],
                                                                                        ["2", "M", 56, 16]]
    assert ds.stats()["user_features"] == ["gender", "age", "occupation", "zip"]
    ds.save(tmp_path / "out")
    from recalign.data.dataset import Dataset
    assert Dataset.load(tmp_path / "out").users["gender"].tolist() == ["F", "M"]


def test_stats_show_warnings_in_table_and_json(tmp_path):
    from typer.testing import CliRunner

    from recalign.cli import app

    (tmp_path / "plays.csv").write_text("user_id,item_id\n1,2\n1,2\n2,3\n")
    runner = CliRunner()
    assert runner.invoke(app, ["data", "prepare", "tabular", "--raw", str(tmp_path / "plays.csv"),
                               "--out", str(tmp_path / "d")]).exit_code == 0
    table = runner.invoke(app, ["data", "stats", str(tmp_path / "d")]).stdout
    assert "warning" in table and "dropped 1 duplicated rows" in table
    stats = json.loads(runner.invoke(app, ["data", "stats", str(tmp_path / "d"), "--json"]).stdout)
    assert stats["warnings"] == ["dropped 1 duplicated rows (same user, item and rating)"]
    assert stats["interactions"] == 2


@pytest.mark.parametrize("sep, text", [("colons", "1::2\n3::4\n"), ("::", "1::2\n3::4\n"), ({":": None}, "1::2\n3::4\n"),
                                       ("pipe", "1|2\n3|4\n"), ("tab", "1\t2\n3\t4\n")])
def test_tabular_separator_names(tmp_path, sep, text):
    (tmp_path / "r.dat").write_text(text)
    ds = prepare_source("tabular", tmp_path / "r.dat", header=False, user=0, item=1, sep=sep)
    assert ds.users["original_id"].tolist() == ["1", "3"] and ds.items["original_id"].tolist() == ["2", "4"]


def test_tabular_empty_separator_from_yaml_is_a_config_error(tmp_path):
    (tmp_path / "r.dat").write_text("1|2\n")
    with pytest.raises(ConfigError, match="sep=tab, comma, space, semicolon, pipe or colons"):
        prepare_source("tabular", tmp_path / "r.dat", sep="")


def test_stats_count_timestamp_ties_and_warn_above_five_percent(tmp_path):
    # user 7: times 100, 100, 200 -> 1 tie in 2 consecutive pairs; user 8: 50, 60 -> none. 1 of 3 pairs = 1/3
    _write_ml100k(tmp_path, ["7\t1\t3\t100\n", "7\t2\t5\t100\n", "7\t3\t4\t200\n", "8\t1\t4\t50\n", "8\t2\t2\t60\n"])
    ds = prepare_source("movielens-100k", tmp_path)
    stats = ds.stats()
    assert stats["timestamp_ties"] == pytest.approx(1 / 3)
    assert any("33% of consecutive interactions of a user share a timestamp" in w for w in stats["warnings"])
    _write_ml100k(tmp_path, ["7\t1\t3\t100\n", "7\t2\t5\t101\n", "8\t1\t4\t50\n"])  # no ties, no warning
    stats = prepare_source("movielens-100k", tmp_path).stats()
    assert stats["timestamp_ties"] == 0.0 and stats["warnings"] == []
