"""Bad raw files for every source, through `recalign data prepare`: exit 2, one error line naming the file, no output.

Each case writes synthetic files into tmp_path (never shared data): (id, source, files, raw, options, named), where
`files` maps a path under tmp_path to its bytes, `raw` is the --raw path, and `named` must appear in the error line.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle

import numpy as np
import pytest
from typer.testing import CliRunner

from recalign.cli import app

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

LFS = (b"version https://git-lfs.github.com/spec/v1\n"
       b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 132\n")
GENRES = b"unknown|0\nAction|1\n"
REVIEW = {"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 100}


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


class _System:
    """Pickles as a call of os.system: a restricted unpickler must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def npy(value) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array(value, dtype=object), allow_pickle=True)
    return buffer.getvalue()


UNISREC_OK = {
    "s/X.item2index": b"A\t0\nB\t1\n", "s/X.user2index": b"u\t0\n",
    "s/X.test.inter": b"user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0\t1\n",
}
GOODREADS_OK = {
    "g/eval/Goodreads/id2name.json": json.dumps({"0": "Dune", "1": "Emma"}).encode(),
    "g/eval/Goodreads/name2genre.json": json.dumps({"Dune": ["fiction"]}).encode(),
    "g/data/Goodreads/train.json": json.dumps([{"instruction": "", "input": 'read: "Dune"',
                                                "output": '"Emma"\n'}]).encode(),
}
RECLMGEN_OK = {"r/sequential.json": b'{"u1": ["1", "2"]}', "r/meta.json": b'{"1": {"title": "A"}, "2": {"title": "B"}}'}
P5_OK = {"p/sequential_data.txt": b"1 0 1\n2 1\n",
         "p/title_maps.npy": npy({"id2title": {"0": "A", "1": "B"}}),
         "p/category_map.npy": npy({"id2category": {"0": [["Beauty", "Nails"]]}})}
LCREC_OK = {"l/Office.item.json": json.dumps({"0": {"title": "Pen", "categories": "Office"}}).encode(),
            "l/Office.inter.json": b'{"0": [0]}'}
RECBOLE_HEADER = b"user_id:token\titem_id_list:token_seq\titem_id:token\n"


def with_(base: dict, **changes) -> dict:
    """A copy of a good fixture with some files replaced (keys use '__' for '/' and '_DOT_' for '.')."""
    files = dict(base)
    for key, value in changes.items():
        files[key.replace("__", "/").replace("_DOT_", ".")] = value
    return files


CASES = [
    # ---- movielens-100k
    ("ml100k-truncated-line", "movielens-100k", {"m/u.data": b"1\t10\t4\t100\n2\t20\t5\n"}, "m", [], "u.data:2"),
    ("ml100k-wrong-separator", "movielens-100k", {"m/u.data": b"1,10,4,100\n"}, "m", [], "u.data:1"),
    ("ml100k-nul-bytes", "movielens-100k", {"m/u.data": b"1\t10\t4\t100\n\x00\x00\x00\n"}, "m", [], "u.data:2"),
    ("ml100k-empty", "movielens-100k", {"m/u.data": b""}, "m", [], "u.data"),
    ("ml100k-negative-id", "movielens-100k", {"m/u.data": b"-1\t10\t4\t100\n"}, "m", [], "u.data:1"),
    ("ml100k-huge-id", "movielens-100k", {"m/u.data": b"1\t99999999999999999999\t4\t100\n"}, "m", [], "u.data:1"),
    ("ml100k-lfs-pointer", "movielens-100k", {"m/u.data": LFS}, "m", [], "u.data"),
    ("ml100k-item-missing-field", "movielens-100k",
     {"m/u.data": b"1\t10\t4\t100\n", "m/u.genre": GENRES, "m/u.item": b"10|Heat (1995)\n"}, "m", [], "u.item:1"),
    # ---- movielens-1m
    ("ml1m-single-colon", "movielens-1m", {"m/ratings.dat": b"1:10:5:978300760\n"}, "m", [], "ratings.dat:1"),
    ("ml1m-missing-field", "movielens-1m", {"m/ratings.dat": b"1::10::5\n"}, "m", [], "ratings.dat:1"),
    ("ml1m-movies-missing-field", "movielens-1m",
     {"m/ratings.dat": b"1::10::5::9\n", "m/movies.dat": b"10::Heat (1995)\n"}, "m", [], "movies.dat:1"),
    ("ml1m-users-bad-age", "movielens-1m",
     {"m/ratings.dat": b"1::10::5::9\n", "m/users.dat": b"1::F::young::10::48067\n"}, "m", [], "users.dat:1"),
    ("ml1m-nul", "movielens-1m", {"m/ratings.dat": b"1::10::5::9\n\x00"}, "m", [], "ratings.dat:2"),
    # ---- amazon2014 / amazon2018
    ("amazon-truncated-json", "amazon2014", {"a/Toy_5.json": jsonl(REVIEW) + b'{"reviewerID": "U2", "as'},
     "a/Toy_5.json", [], "Toy_5.json:2"),
    ("amazon-non-utf8", "amazon2014", {"a/Toy_5.json": b'{"reviewerID": "\xff", "asin": "B1"}\n'},
     "a/Toy_5.json", [], "Toy_5.json:1"),
    ("amazon-nul", "amazon2014", {"a/Toy_5.json": jsonl(REVIEW) + b"\x00\x00\n"}, "a/Toy_5.json", [], "Toy_5.json:2"),
    ("amazon-gz-not-gzip", "amazon2014", {"a/Toy_5.json.gz": jsonl(REVIEW)}, "a/Toy_5.json.gz", [], "Toy_5.json.gz"),
    ("amazon-truncated-gzip", "amazon2014", {"a/Toy_5.json.gz": gz(jsonl(REVIEW) * 50)[:40]}, "a/Toy_5.json.gz", [],
     "Toy_5.json.gz"),
    ("amazon-missing-field", "amazon2018", {"a/Toy_5.json": jsonl({k: v for k, v in REVIEW.items() if k != "overall"})},
     "a/Toy_5.json", [], "Toy_5.json:1"),
    ("amazon-rating-not-number", "amazon2018", {"a/Toy_5.json": jsonl({**REVIEW, "overall": "five"})},
     "a/Toy_5.json", [], "Toy_5.json:1"),
    ("amazon-empty", "amazon2018", {"a/Toy_5.json": b""}, "a/Toy_5.json", [], "Toy_5.json"),
    ("amazon-lfs-pointer", "amazon2018", {"a/Toy_5.json": LFS}, "a/Toy_5.json", [], "Toy_5.json"),
    ("amazon-bad-meta-line", "amazon2014", {"a/Toy_5.json": jsonl(REVIEW), "a/meta_Toy.json": b"{'asin': 'B1', (\n"},
     "a", [], "meta_Toy.json:1"),
    ("amazon-meta-lfs", "amazon2014", {"a/Toy_5.json": jsonl(REVIEW), "a/meta_Toy.json": LFS}, "a", [],
     "meta_Toy.json"),
    # ---- unisrec
    ("unisrec-index-not-number", "unisrec", with_(UNISREC_OK, s__X_DOT_item2index=b"A\tzero\n"), "s", [],
     "X.item2index:1"),
    ("unisrec-inter-missing-field", "unisrec", with_(UNISREC_OK, s__X_DOT_test_DOT_inter=RECBOLE_HEADER + b"0\t0\n"),
     "s", [], "X.test.inter:2"),
    ("unisrec-lfs", "unisrec", with_(UNISREC_OK, s__X_DOT_user2index=LFS), "s", [], "X.user2index"),
    # ---- s3rec
    ("s3rec-repeated-user", "s3rec", {"Seq.txt": b"1 10 11\n2 10\n1 14\n"}, "Seq.txt", [], "Seq.txt:3"),
    ("s3rec-two-column-table", "s3rec", {"Seq.txt": b"1 10\n2 10\n3 11\n"}, "Seq.txt", [], "Seq.txt:1"),
    ("s3rec-tab-separated", "s3rec", {"Seq.txt": b"1 10 11\n2\t10\t3\n"}, "Seq.txt", [], "Seq.txt:2"),
    ("s3rec-non-utf8", "s3rec", {"Seq.txt": b"1 10 11\n2 1\xe9\n"}, "Seq.txt", [], "Seq.txt:2"),
    ("s3rec-empty", "s3rec", {"Seq.txt": b"\n\n"}, "Seq.txt", [], "Seq.txt"),
    ("s3rec-negative-id", "s3rec", {"Seq.txt": b"1 10 -11\n"}, "Seq.txt", [], "Seq.txt:1"),
    ("s3rec-user-only", "s3rec", {"Seq.txt": b"1 10 11\n2\n"}, "Seq.txt", [], "Seq.txt:2"),
    # ---- goodreads-sprec
    ("goodreads-truncated-json", "goodreads-sprec",
     with_(GOODREADS_OK, g__eval__Goodreads__id2name_DOT_json=b'{"0": "Dune", "1'), "g", [], "id2name.json:1"),
    ("goodreads-non-utf8", "goodreads-sprec", with_(GOODREADS_OK, g__data__Goodreads__train_DOT_json=b'[{"input": "\xff'),
     "g", [], "train.json:1"),
    ("goodreads-no-genres", "goodreads-sprec",
     {k: v for k, v in GOODREADS_OK.items() if "name2genre" not in k}, "g", [], "name2genre.json"),
    ("goodreads-missing-field", "goodreads-sprec",
     with_(GOODREADS_OK, g__data__Goodreads__train_DOT_json=b'[{"instruction": "", "input": "read: \\"Dune\\""}]'),
     "g", [], "train.json"),
    # ---- reclmgen-pickle
    ("reclmgen-truncated-pickle", "reclmgen-pickle",
     {"r/sequential.pickle": pickle.dumps({"u1": [1, 2]})[:-5], "r/meta.json": RECLMGEN_OK["r/meta.json"]},
     "r", [], "sequential.pickle"),
    ("reclmgen-lfs-pickle", "reclmgen-pickle", {"r/sequential.pickle": LFS, "r/meta.json": RECLMGEN_OK["r/meta.json"]},
     "r", [], "sequential.pickle"),
    ("reclmgen-meta-wrong-type", "reclmgen-pickle", with_(RECLMGEN_OK, r__meta_DOT_json=b'["A", "B"]'), "r", [],
     "meta.json"),
    # ---- recgpt-pickle
    ("recgpt-callable", "recgpt-pickle", {"t/test.pkl": pickle.dumps({1: _System()})}, "t", [], "test.pkl"),
    ("recgpt-empty-file", "recgpt-pickle", {"t/test.pkl": b""}, "t", [], "test.pkl"),
    ("recgpt-negative-id", "recgpt-pickle", {"t/test.pkl": pickle.dumps({1: [2, -3]})}, "t", [], "test.pkl"),
    ("recgpt-empty-dict", "recgpt-pickle", {"t/test.pkl": pickle.dumps({})}, "t", [], "test.pkl"),
    # ---- tabular
    ("tabular-wrong-separator", "tabular", {"plays.csv": b"user_id\titem_id\n1\t2\n"}, "plays.csv", [], "plays.csv"),
    ("tabular-missing-column", "tabular", {"plays.tsv": b"user_id\tartist\n1\t2\n"}, "plays.tsv", [], "plays.tsv"),
    ("tabular-empty-id", "tabular", {"plays.tsv": b"user_id\titem_id\n1\t2\n\t3\n"}, "plays.tsv", [], "plays.tsv:3"),
    ("tabular-rating-not-number", "tabular", {"plays.tsv": b"user_id\titem_id\tplays\n1\t2\tmany\n"}, "plays.tsv",
     ["rating=plays"], "plays.tsv:2"),
    ("tabular-ragged-rows", "tabular", {"plays.csv": b"user_id,item_id\n1,2\n1,2,3,4\n"}, "plays.csv", [],
     "plays.csv:3"),
    ("tabular-non-utf8", "tabular", {"plays.tsv": b"user_id\titem_id\n\xe91\t2\n"}, "plays.tsv", [], "plays.tsv:2"),
    ("tabular-nul", "tabular", {"plays.tsv": b"user_id\titem_id\n1\t2\x00\n"}, "plays.tsv", [], "plays.tsv:2"),
    ("tabular-empty", "tabular", {"plays.tsv": b""}, "plays.tsv", [], "plays.tsv"),
    ("tabular-header-only", "tabular", {"plays.tsv": b"user_id\titem_id\n"}, "plays.tsv", [], "plays.tsv"),
    ("tabular-bad-parquet", "tabular", {"plays.parquet": b"PAR1 this is not parquet"}, "plays.parquet", [],
     "plays.parquet"),
    ("tabular-lfs", "tabular", {"plays.parquet": LFS}, "plays.parquet", [], "plays.parquet"),
    ("tabular-items-missing-column", "tabular",
     {"plays.tsv": b"user_id\titem_id\n1\t2\n", "items.tsv": b"item_id\tname\n2\tX\n"}, "plays.tsv",
     ["items=items.tsv", "item_title=title"], "items.tsv"),
    # ---- p5-text
    ("p5-lfs-npy", "p5-text", with_(P5_OK, p__title_maps_DOT_npy=LFS), "p", [], "title_maps.npy"),
    ("p5-not-npy", "p5-text", with_(P5_OK, p__title_maps_DOT_npy=b"just text"), "p", [], "title_maps.npy"),
    ("p5-npy-callable", "p5-text", with_(P5_OK, p__category_map_DOT_npy=npy({"id2category": _System()})), "p", [],
     "category_map.npy"),
    ("p5-npy-wrong-content", "p5-text", with_(P5_OK, p__title_maps_DOT_npy=npy({"titles": {}})), "p", [],
     "title_maps.npy"),
    ("p5-repeated-user", "p5-text", with_(P5_OK, p__sequential_data_DOT_txt=b"1 0\n1 1\n"), "p", [],
     "sequential_data.txt:2"),
    # ---- lcrec
    ("lcrec-truncated-json", "lcrec", with_(LCREC_OK, l__Office_DOT_inter_DOT_json=b'{"0": [0,'), "l", [],
     "Office.inter.json:1"),
    ("lcrec-title-not-string", "lcrec",
     with_(LCREC_OK, l__Office_DOT_item_DOT_json=b'{"0": {"title": 5}}'), "l", [], "Office.item.json"),
    ("lcrec-negative-item", "lcrec", with_(LCREC_OK, l__Office_DOT_inter_DOT_json=b'{"0": [-1]}'), "l", [],
     "Office.inter.json"),
    # ---- recbole
    ("recbole-missing-column", "recbole", {"b/G.test.inter": b"user_id:token\titem_id:token\n0\t1\n"}, "b", [],
     "G.test.inter"),
    ("recbole-repeated-user", "recbole", {"b/G.test.inter": RECBOLE_HEADER + b"0\t1 2\t3\n0\t2\t1\n"}, "b", [],
     "G.test.inter:3"),
    ("recbole-non-utf8", "recbole", {"b/G.test.inter": RECBOLE_HEADER + b"0\t1 \xff\t3\n"}, "b", [], "G.test.inter:2"),
]


def _write(tmp_path, files: dict) -> None:
    for name, data in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.mark.parametrize("case_id, source, files, raw, options, named", CASES, ids=[c[0] for c in CASES])
def test_bad_raw_input_is_one_line_exit_2_and_nothing_written(tmp_path, case_id, source, files, raw, options, named):
    _write(tmp_path, files)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "prepare", source, "--raw", str(tmp_path / raw), "--out", str(out),
                                      *options])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("recalign: error: "), lines[0]
    assert named in lines[0], (named, lines[0])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left behind


def test_every_source_is_covered():
    from recalign.data.sources import SOURCES

    covered = {case[1] for case in CASES}
    assert set(SOURCES) - covered == {"synthetic"}  # synthetic reads no raw files
    assert len(CASES) >= 35
