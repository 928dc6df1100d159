"""Amazon review data as distributed by McAuley et al.: 2014 and 2018 5-core review files + optional metadata.

Reviews (both years): JSON lines with `reviewerID`, `asin`, `overall`, `unixReviewTime` (other keys ignored);
`.gz` is read directly. Metadata: 2014 `meta_*.json(.gz)` lines are Python literals (`{'asin': ..., 'title': ...,
'categories': [[...]]}`) read with `ast.literal_eval` (never eval); 2018 `meta_*.json(.gz)` are JSON lines with
`title` and `category` (one path). Only metadata lines of reviewed items are parsed (an `asin` regex filters first),
so a whole-category metadata file costs little. Categories are the elements of the item's category paths without
the shared root department ("Beauty"), first occurrence order.
"""

from __future__ import annotations

import ast
import gzip
import html
import io
import json
import re
from pathlib import Path

import pandas as pd
from pydantic import Field

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.rawfile import check_raw_file, open_raw_lines
from recalign.data.sources import Source, SourceConfig
from recalign.errors import ConfigError, DataError

REVIEW_FIELDS = {"reviewerID": "user", "asin": "item", "overall": "rating", "unixReviewTime": "timestamp"}
_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


class AmazonSourceConfig(SourceConfig):
    """Where the files are (when --raw is a folder) and what to keep."""

    reviews: str | None = Field(None, description="review file inside the --raw folder (default: the one "
                                                  "*_5.json[.gz] / reviews_* file); ignored when --raw is a file")
    meta: str | None = Field(None, description="metadata file (path, or name inside the folder); default: the "
                                               "folder's meta_* file if there is exactly one, else none")
    min_rating: float | None = Field(None, description="keep only reviews with overall >= this value")
    drop_duplicates: bool = Field(True, description="keep only the first review of a (user, item) pair "
                                                    "(the 2018 files repeat some)")


def open_text(path: Path):
    """A text handle on `path`, transparently gunzipping `.gz` files (after the raw-file checks)."""
    check_raw_file(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _resolve(raw: Path, options: AmazonSourceConfig) -> tuple[Path, Path | None]:
    folder = raw.parent if raw.is_file() else raw
    if raw.is_file():
        reviews = raw
    elif options.reviews is not None:
        reviews = folder / options.reviews
    else:
        found = sorted({*folder.glob("*_5.json*"), *folder.glob("reviews_*.json*")})
        if len(found) != 1:
            raise ConfigError(f"{folder}: pass reviews=FILE (found {len(found)} review files: "
                              f"{', '.join(p.name for p in found) or 'none'})")
        reviews = found[0]
    if not reviews.is_file():
        raise DataError("missing file", path=reviews)
    meta = None
    if options.meta is not None:
        meta = Path(options.meta) if Path(options.meta).is_absolute() else folder / options.meta
        if not meta.is_file():
            raise DataError("missing metadata file", path=meta)
    else:
        found = sorted(folder.glob("meta_*.json*"))
        meta = found[0] if len(found) == 1 else None
    return reviews, meta


def read_reviews(path: Path, chunk_lines: int = 200_000) -> pd.DataFrame:
    """(user, item, rating, timestamp) from a JSON-lines review file, read in chunks with pandas."""
    frames = []
    check_raw_file(path)
    try:
        reader = pd.read_json(path, lines=True, chunksize=chunk_lines, dtype=False, compression="infer",
                              encoding="utf-8")
        for chunk in reader:
            if not isinstance(chunk, pd.DataFrame) or not len(chunk.columns):
                _locate_bad_review(path)
            missing = [f for f in REVIEW_FIELDS if f not in chunk.columns]
            if missing or chunk[list(REVIEW_FIELDS)].isna().to_numpy().any():
                _locate_bad_review(path)
            frames.append(chunk[list(REVIEW_FIELDS)].rename(columns=REVIEW_FIELDS))
    except (ValueError, OSError, EOFError, TypeError, AttributeError):
        # UnicodeDecodeError is a ValueError; gzip errors are OSError/EOFError: the line scan names the cause
        _locate_bad_review(path)
        raise
    if not frames:
        raise DataError("no reviews", path=path)
    frame = pd.concat(frames, ignore_index=True)
    for column in ("rating", "timestamp"):
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any():
            _locate_bad_review(path)
        frame[column] = values
    return frame


def _locate_bad_review(path: Path) -> None:
    """Slow scan run only after a failure: raise a DataError naming the first bad line and field."""
    for number, line in open_raw_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", path=path, line=number) from None
        if not isinstance(record, dict):
            raise DataError("expected a JSON object per line", path=path, line=number)
        for name in REVIEW_FIELDS:
            if name not in record or record[name] is None:
                raise DataError("missing field", path=path, line=number, field=name)
        for name in ("overall", "unixReviewTime"):
            if isinstance(record[name], bool) or not isinstance(record[name], (int, float)):
                raise DataError(f"expected a number, got {record[name]!r}", path=path, line=number, field=name)
    raise DataError("cannot read review lines (expected JSON objects with "
                    f"{', '.join(REVIEW_FIELDS)})", path=path)


def read_metadata(path: Path, asins: set[str]) -> pd.DataFrame:
    """item, title, categories, text for the `asins` found in a 2014 (literal) or 2018 (JSON) metadata file."""
    rows = []
    for number, line in open_raw_lines(path):
        match = _ASIN.search(line)
        if match is None or match.group(1) not in asins:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            try:  # 2014 metadata: Python literals with single quotes
                record = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
                raise DataError(f"neither JSON nor a Python literal ({type(exc).__name__})", path=path,
                                line=number) from None
        if not isinstance(record, dict):
            raise DataError("expected an object per line", path=path, line=number)
        rows.append(_meta_row(record))
    frame = pd.DataFrame(rows, columns=["item", "title", "categories", "brand"])
    frame = frame.drop_duplicates("item", keep="first")
    frame["text"] = [". ".join(p for p in (t, ", ".join(c), b) if p) + "." if (t or c or b) else ""
                     for t, c, b in zip(frame["title"], frame["categories"], frame["brand"])]
    return frame[["item", "title", "categories", "text"]]


def _meta_row(record: dict) -> tuple[str, str, list[str], str]:
    categories = categories_from_paths(record.get("categories", record.get("category", [])))
    title = html.unescape(str(record.get("title") or "")).strip()
    brand = html.unescape(str(record.get("brand") or "")).strip()
    return str(record["asin"]), title, categories, brand


def categories_from_paths(paths) -> list[str]:
    """The categories of Amazon category paths (one path or a list of paths), without the shared root department."""
    if isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths):
        paths = [paths]  # 2018: one path as a list of strings
    categories: list[str] = []
    for category_path in paths if isinstance(paths, list) else []:
        if not isinstance(category_path, list):
            continue
        for name in category_path[1:] if len(category_path) > 1 else category_path:
            name = html.unescape(str(name)).strip()
            if name and name not in categories:
                categories.append(name)
    return categories


def _load(raw: Path, options: AmazonSourceConfig, year: int) -> Dataset:
    reviews_path, meta_path = _resolve(raw, options)
    reviews = read_reviews(reviews_path)
    if options.min_rating is not None:
        reviews = reviews[reviews["rating"] >= options.min_rating]
    n_before = len(reviews)
    if options.drop_duplicates:
        reviews = reviews.drop_duplicates(["user", "item"], keep="first")
    files = [reviews_path]
    items = None
    if meta_path is not None:
        reviewed = pd.unique(reviews["item"].astype(str))
        meta = read_metadata(meta_path, set(reviewed))
        # catalog = reviewed items in first-appearance order, with metadata where the file has it
        items = pd.DataFrame({"item": reviewed}).merge(meta, on="item", how="left")
        items["title"] = items["title"].fillna("")
        items["text"] = items["text"].fillna("")
        items["categories"] = [c if isinstance(c, list) else [] for c in items["categories"]]
        files.append(meta_path)
    name = re.sub(r"(\.json)?(\.gz)?$", "", reviews_path.name)
    dataset = build_dataset(reviews, items=items, name=name, source=f"amazon{year}", raw_files=files,
                            options=options.model_dump(), drop_duplicate_rows=options.drop_duplicates)
    dataset.info["duplicates_dropped"] = int(n_before - len(reviews))
    if n_before > len(reviews):
        dataset.warn(f"dropped {n_before - len(reviews)} repeated reviews of the same (user, item) pair "
                     "(drop_duplicates=false keeps them)")
    if items is not None:
        dataset.info["items_without_metadata"] = int((dataset.items["title"] == "").sum())
    return dataset


def load_amazon2014(raw: Path, options: AmazonSourceConfig) -> Dataset:
    """Amazon 2014 5-core reviews (+ Python-literal metadata)."""
    return _load(raw, options, 2014)


def load_amazon2018(raw: Path, options: AmazonSourceConfig) -> Dataset:
    """Amazon 2018 5-core reviews (+ JSON-lines metadata)."""
    return _load(raw, options, 2018)


AMAZON_2014 = Source("amazon2014", AmazonSourceConfig, load_amazon2014,
                     "Amazon 2014 5-core reviews JSON lines (.gz ok) + optional meta_*.json (Python literals)")
AMAZON_2018 = Source("amazon2018", AmazonSourceConfig, load_amazon2018,
                     "Amazon 2018 5-core reviews JSON lines (.gz ok) + optional meta_*.json (JSON lines)")
