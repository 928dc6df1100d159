"""Read every real dataset in ../shared/data with its source, check the published counts, and time it.

Usage: .venv/bin/python benchmarks/data_sources.py [--data ../shared/data]
Writes benchmarks/results/data_sources.json (one row per dataset, dated) and prints a table; exits 1 when a count differs from
the one stated in ../shared/data/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from recalign.data.sources import prepare_source

ROOT = Path(__file__).resolve().parents[1]

# (label, source, raw path under data/, options, expected (users, items, interactions) or None)
CASES = [
    ("ml-100k", "movielens-100k", "ml-100k", {}, (943, 1682, 100_000)),
    ("s3rec Beauty", "s3rec", "s3rec-seq/Beauty.txt", {}, (22_363, 12_101, 198_502)),
    ("s3rec Sports", "s3rec", "s3rec-seq", {"name": "Sports_and_Outdoors"}, (35_598, 18_357, 296_337)),
    ("s3rec Toys", "s3rec", "s3rec-seq", {"name": "Toys_and_Games"}, (19_412, 11_924, 167_597)),
    ("s3rec LastFM", "s3rec", "s3rec-seq", {"name": "LastFM"}, (1_090, 3_646, 52_551)),
    ("s3rec Yelp", "s3rec", "s3rec-seq", {"name": "Yelp"}, (30_431, 20_033, 316_354)),
    ("unisrec Scientific", "unisrec", "amazon-scientific-unisrec", {}, (8_442, 4_385, None)),
    ("goodreads-sprec train", "goodreads-sprec", "goodreads-sprec", {}, (5_000, 4_058, None)),
    ("goodreads-sprec CE-DPO test", "goodreads-sprec", "goodreads-sprec",
     {"files": ["sampled_ClusterExposure-DPO/test.json"]}, (1_000, 4_058, None)),
    ("steam recgpt test", "recgpt-pickle", "steam-recgpt/data/test/steam", {"file": "test"}, (33_445, 11_060, 423_630)),
    ("steam recgpt cold_test", "recgpt-pickle", "steam-recgpt/data/test/steam", {"file": "cold_test"},
     (33_445, 6_713, 100_397)),
    # the four folders added for issue 9; counts from ../shared/data/README.md
    ("p5-text Beauty", "p5-text", "p5-text/beauty", {}, (22_363, 12_101, 198_502)),
    ("p5-text Toys", "p5-text", "p5-text/toys", {}, (19_412, 11_924, 167_597)),
    ("LLMRank Games-6k", "recbole", "amazon-games-llmrank", {}, (50_546, 16_859, 440_264)),
    ("LC-Rec Office", "lcrec", "amazon-office-lcrec", {}, (4_905, 2_420, 53_258)),
    ("ml-1m-sample", "movielens-1m", "ml-1m-sample", {}, (5_958, 3_312, 100_000)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    rows = []
    for label, source, raw, options, expected in CASES:
        path = args.data / raw
        if not path.exists():
            rows.append({"dataset": label, "source": source, "skipped": f"{path} not found"})
            continue
        start = time.perf_counter()
        dataset = prepare_source(source, path, **options)
        seconds = time.perf_counter() - start
        got = (dataset.n_users, dataset.n_items, len(dataset.interactions))
        ok = all(e is None or e == g for e, g in zip(expected, got))
        extra = {k: dataset.info[k] for k in ("unknown_titles", "records", "warnings") if k in dataset.info}
        features = [c for c in dataset.users.columns if c not in ("user_id", "original_id")]
        if features:
            extra["user_features"] = features
        rows.append({"dataset": label, "source": source, "options": options, "users": got[0], "items": got[1],
                     "interactions": got[2], "expected": list(expected), "matches": ok, "seconds": round(seconds, 3),
                     "items_with_title": int((dataset.items["title"] != "").sum()),
                     "categories": len(dataset.category_index()), **extra})
    out = ROOT / "benchmarks" / "results" / "data_sources.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    today = time.strftime("%Y-%m-%d")
    out.write_text(json.dumps([{**r, "date": today} for r in rows], indent=2))

    table = Table(title="recalign sources on the real datasets")
    for column in ("dataset", "source", "users", "items", "interactions", "titles", "categories", "check",
                   "seconds"):
        table.add_column(column, justify="left" if column in ("dataset", "source") else "right")
    for r in rows:
        if "skipped" in r:
            table.add_row(r["dataset"], r["source"], *[""] * 5, "skipped", "")
            continue
        table.add_row(r["dataset"], r["source"], f"{r['users']:,}", f"{r['items']:,}", f"{r['interactions']:,}",
                      f"{r['items_with_title']:,}", str(r["categories"]), "ok" if r["matches"] else "MISMATCH",
                      f"{r['seconds']:.2f}")
    Console(width=140).print(table)
    print(f"wrote {out}")
    if any(not r.get("matches", True) for r in rows):
        raise SystemExit("some datasets do not match their published counts")


if __name__ == "__main__":
    main()
