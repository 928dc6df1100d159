"""SPRec's Goodreads sample: Alpaca prompt records (`{instruction, input, output}`) + a book catalog with genres.

Layout (as in RegionCh/SPRec): `eval/Goodreads/id2name.json` (id -> title), `eval/Goodreads/name2genre.json`
(title -> genres) and prompt files such as `data/Goodreads/train.json`. Each record becomes one user
(original id `FILE:INDEX`) whose sequence is the double-quoted titles listed in `input` followed by the quoted
title in `output`. Titles missing from the catalog are dropped by default and counted in `info["unknown_titles"]`
(or added to the catalog with `unknown_titles=add`); `info["records"]` counts records per file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.rawfile import read_raw_json
from recalign.data.sources import Source, SourceConfig
from recalign.errors import DataError

_FIELDS = ("instruction", "input", "output")


class GoodreadsSourceConfig(SourceConfig):
    """Which prompt files to read and where the catalog is, relative to the folder given as --raw."""

    files: list[str] = Field(["data/Goodreads/train.json"],
                             description="Alpaca JSON prompt files to read, relative to --raw; e.g. "
                                         "[data/Goodreads/train.json, sampled_ClusterExposure-DPO/test.json]")
    catalog: str = Field("eval/Goodreads", description="folder with id2name.json and name2genre.json")
    unknown_titles: Literal["drop", "add"] = Field(
        "drop", description="titles missing from the catalog: drop them (counted in info) or add them as items")
    require_genres: bool = Field(True, description="a missing name2genre.json is an error; false prepares "
                                                   "without categories (a warning in the stats)")


def read_alpaca_records(path: Path) -> pd.DataFrame:
    """The records of an Alpaca prompt file as a frame (instruction, input, output); checks every field."""
    records = read_raw_json(path)
    if not isinstance(records, list):
        raise DataError("expected a JSON array of {instruction, input, output} records", path=path)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"record {index}: expected an object, got {type(record).__name__}", path=path)
        for name in ("input", "output"):
            if not isinstance(record.get(name), str):
                problem = "missing" if name not in record else f"not a string ({type(record[name]).__name__})"
                raise DataError(f"record {index}: {problem}", path=path, field=name)
    return pd.DataFrame({name: [r.get(name, "") for r in records] for name in _FIELDS})


def parse_quoted_titles(inputs: pd.Series) -> pd.Series:
    """Lists of titles from prompts like 'read these before: "A", "B", please ...' (text between outer quotes)."""
    inner = inputs.str.extract(r'"(.*)"', expand=False)  # greedy: first to last quote, keeps quotes inside titles
    return inner.map(lambda s: s.split('", "') if isinstance(s, str) else [])


def parse_output_title(outputs: pd.Series) -> pd.Series:
    """The title of an `output` field: one quoted title and a newline."""
    stripped = outputs.str.strip()
    quoted = stripped.str.startswith('"') & stripped.str.endswith('"') & (stripped.str.len() >= 2)
    return stripped.where(~quoted, stripped.str.slice(1, -1))


def load_goodreads(raw: Path, options: GoodreadsSourceConfig) -> Dataset:
    """Catalog (id order) with genres as categories; one user per prompt record: history titles then target."""
    if not raw.is_dir():
        raise DataError("expected the dataset folder (with eval/Goodreads/ and data/Goodreads/)", path=raw)
    id_path = raw / options.catalog / "id2name.json"
    genre_path = raw / options.catalog / "name2genre.json"
    catalog = _read_book_catalog(id_path, genre_path, options.require_genres)
    files = [id_path] + ([genre_path] if genre_path.is_file() else [])
    rows, counts = _read_prompt_rows(raw, options.files, files)
    rows, catalog, n_unknown, unknown_titles = _match_titles(rows, catalog, options.unknown_titles)
    dataset = build_dataset(rows[["user", "item", "timestamp"]], items=catalog, name="goodreads",
                            source="goodreads-sprec", raw_files=files, options=options.model_dump())
    dataset.info["records"] = counts
    if not genre_path.is_file():
        dataset.warn(f"{genre_path.name} not found: items have no categories")
    dataset.info["unknown_titles"] = n_unknown
    dataset.info["unknown_distinct_titles"] = len(unknown_titles)
    dataset.info["unknown_title_examples"] = [str(t) for t in unknown_titles[:5]]
    return dataset


def _read_book_catalog(id_path: Path, genre_path: Path, require_genres: bool) -> pd.DataFrame:
    """Items (id order: numeric ids first) with title, genres as categories and text, from id2name.json and
    name2genre.json (no genres when that file is missing and not required)."""
    id2name = read_raw_json(id_path)
    if not isinstance(id2name, dict):
        raise DataError("expected an object id -> title", path=id_path)
    if not genre_path.is_file() and require_genres:
        raise DataError("missing file name2genre.json (item genres); pass require_genres=false to prepare "
                        "without categories", path=genre_path)
    genres = read_raw_json(genre_path) if genre_path.is_file() else {}
    if not isinstance(genres, dict):
        raise DataError("expected an object title -> list of genres", path=genre_path)
    ids = sorted(id2name, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))
    catalog = pd.DataFrame({"item": ids, "title": [str(id2name[k]) for k in ids]})
    catalog["categories"] = catalog["title"].map(lambda t: [str(g) for g in genres.get(t, [])])
    catalog["text"] = [f"{t}. Genres: {', '.join(c)}." if c else f"{t}." for t, c in
                       zip(catalog["title"], catalog["categories"])]
    return catalog


def _read_prompt_rows(raw: Path, names: list[str], files: list[Path]) -> tuple[pd.DataFrame, dict[str, int]]:
    """(user, title, timestamp) rows of every prompt file in order, and the records per file; each file read is
    appended to `files`."""
    frames, counts = [], {}
    for name in names:
        path = raw / name
        frame, counts[name] = _prompt_sequences(path, name)
        frames.append(frame)
        files.append(path)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["user", "title", "timestamp"])
    return rows, counts


def _prompt_sequences(path: Path, name: str) -> tuple[pd.DataFrame, int]:
    """(rows: one user `NAME:INDEX` per record, its history titles then the target, number of records)."""
    records = read_alpaca_records(path)
    history = parse_quoted_titles(records["input"])
    empty = history.str.len() == 0
    if empty.any():
        index = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataError(f"record {index}: no double-quoted titles in input", path=path, field="input")
    target = parse_output_title(records["output"])
    sequences = [h + [t] for h, t in zip(history, target)]
    frame = pd.DataFrame({"user": [f"{name}:{i}" for i in range(len(records))], "title": sequences})
    frame = frame.explode("title", ignore_index=True)
    frame["timestamp"] = frame.groupby("user", sort=False).cumcount()
    return frame, len(records)


def _match_titles(rows: pd.DataFrame, catalog: pd.DataFrame, unknown_titles: str
                  ) -> tuple[pd.DataFrame, pd.DataFrame, int, np.ndarray]:
    """(rows with their item id, catalog, number of rows with an unknown title, the distinct unknown titles).

    A title maps to the first catalog item carrying it; unknown titles are dropped, or added to the catalog as
    items `title:TITLE` when `unknown_titles` is "add".
    """
    title_to_id = pd.Series(catalog["item"].to_numpy(), index=catalog["title"].to_numpy())
    title_to_id = title_to_id[~title_to_id.index.duplicated(keep="first")]
    rows["item"] = rows["title"].map(title_to_id)
    unknown = rows["item"].isna()
    unknown_distinct = pd.unique(rows.loc[unknown, "title"])
    if unknown_titles == "add" and len(unknown_distinct):
        extra = pd.DataFrame({"item": [f"title:{t}" for t in unknown_distinct], "title": unknown_distinct})
        extra["categories"] = [[] for _ in range(len(extra))]
        extra["text"] = extra["title"] + "."
        catalog = pd.concat([catalog, extra], ignore_index=True)
        rows.loc[unknown, "item"] = "title:" + rows.loc[unknown, "title"]
    else:
        rows = rows[~unknown]
    return rows, catalog, int(unknown.sum()), unknown_distinct


GOODREADS_SPREC = Source("goodreads-sprec", GoodreadsSourceConfig, load_goodreads,
                         "SPRec Goodreads folder: eval/Goodreads/{id2name,name2genre}.json + Alpaca prompt files")
