"""MovieLens-100K (`u.data`, `u.item`, `u.genre`) and MovieLens-1M (`ratings.dat`, `movies.dat`) as distributed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import Field

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.sources import Source, SourceConfig, require_file
from recalign.data.sources.tabular import read_delimited

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]


class MovieLensSourceConfig(SourceConfig):
    """Options shared by both MovieLens sizes."""

    min_rating: float | None = Field(None, description="keep only ratings >= this value (e.g. 4); default keeps all")


def _filter_ratings(frame: pd.DataFrame, options: MovieLensSourceConfig) -> pd.DataFrame:
    if options.min_rating is not None:
        frame = frame[frame["rating"] >= options.min_rating]
    return frame


def load_ml100k(raw: Path, options: MovieLensSourceConfig) -> Dataset:
    """Read the ml-100k folder: ratings from u.data, titles + genre flags from u.item (latin-1), u.user features."""
    data_path = require_file(raw, "u.data")
    folder = data_path.parent
    ratings = read_delimited(data_path, "\t", ["user", "item", "rating", "timestamp"],
                             numeric=("rating", "timestamp"), ids=("user", "item"))
    ratings = _filter_ratings(ratings, options)
    files = [data_path]
    items = None
    item_path = folder / "u.item"
    if item_path.is_file():
        genre_path = folder / "u.genre"
        genres = ML100K_GENRES
        if genre_path.is_file():
            table = read_delimited(genre_path, "|", ["name", "index"], numeric=("index",))
            genres = table.sort_values("index")["name"].tolist()
            files.append(genre_path)
        columns = ["item", "title", "release", "video_release", "url"] + [f"g{i}" for i in range(len(genres))]
        meta = read_delimited(item_path, "|", columns, encoding="latin-1", ids=("item",),
                              min_columns=len(columns))
        flags = meta[[f"g{i}" for i in range(len(genres))]].to_numpy() == "1"
        meta["item"] = meta["item"].astype("int64").astype(str)
        meta["categories"] = [[g for g, on in zip(genres, row) if on] for row in flags]
        meta["text"] = [f"{t}. Genres: {', '.join(c)}." for t, c in zip(meta["title"], meta["categories"])]
        items = meta[["item", "title", "categories", "text"]]
        files.append(item_path)
    users = None
    users_path = folder / "u.user"
    if users_path.is_file():  # user features (age, gender, occupation) for CTR models
        users = read_delimited(users_path, "|", ["user", "age", "gender", "occupation", "zip"], ids=("user",),
                               numeric=("age",), encoding="latin-1")
        users = users.astype({"user": "int64", "age": "int64"}).astype({"user": str})
        files.append(users_path)
    ratings["user"] = ratings["user"].astype("int64").astype(str)
    ratings["item"] = ratings["item"].astype("int64").astype(str)
    return build_dataset(ratings, items=items, name="ml-100k", source="movielens-100k", raw_files=files,
                         options=options.model_dump(), users=users)


def load_ml1m(raw: Path, options: MovieLensSourceConfig) -> Dataset:
    """Read the ml-1m folder: ratings.dat, movies.dat (Latin-1 or UTF-8), users.dat (gender, age, occupation, zip)."""
    data_path = require_file(raw, "ratings.dat")
    folder = data_path.parent
    ratings = read_delimited(data_path, "::", ["user", "item", "rating", "timestamp"],
                             numeric=("rating", "timestamp"), ids=("user", "item"), encoding="latin-1")
    ratings = _filter_ratings(ratings, options)
    files = [data_path]
    items = None
    movies_path = folder / "movies.dat"
    if movies_path.is_file():
        # GroupLens ships Latin-1; some mirrors re-encoded it as UTF-8: try UTF-8 first, then Latin-1
        meta = read_delimited(movies_path, "::", ["item", "title", "genres"], ids=("item",),
                              encoding="utf-8", fallback_encoding="latin-1")
        meta["item"] = meta["item"].astype("int64").astype(str)
        meta["categories"] = meta["genres"].str.split("|")
        meta["text"] = meta["title"] + ". Genres: " + meta["genres"].str.replace("|", ", ", regex=False) + "."
        items = meta[["item", "title", "categories", "text"]]
        files.append(movies_path)
    users = None
    users_path = folder / "users.dat"
    if users_path.is_file():
        users = read_delimited(users_path, "::", ["user", "gender", "age", "occupation", "zip"], ids=("user",),
                               numeric=("age", "occupation"), encoding="utf-8", fallback_encoding="latin-1")
        users["user"] = users["user"].astype("int64").astype(str)
        users = users.astype({"age": "int64", "occupation": "int64"})
        files.append(users_path)
    ratings["user"] = ratings["user"].astype("int64").astype(str)
    ratings["item"] = ratings["item"].astype("int64").astype(str)
    dataset = build_dataset(ratings, items=items, name="ml-1m", source="movielens-1m", raw_files=files,
                            options=options.model_dump(), keep_items_without_interactions=False, users=users)
    damaged = int(dataset.items["title"].str.contains("\ufffd", regex=False).sum())
    if damaged:
        dataset.warn(f"{damaged} titles contain U+FFFD replacement characters (the file was decoded wrongly "
                     "before it was saved; the original letters are lost)")
    return dataset


MOVIELENS_100K = Source("movielens-100k", MovieLensSourceConfig, load_ml100k,
                        "MovieLens 100K folder (u.data, u.item, u.genre)")
MOVIELENS_1M = Source("movielens-1m", MovieLensSourceConfig, load_ml1m, "MovieLens 1M folder (ratings.dat, movies.dat, users.dat; "
                       "Latin-1 or UTF-8)")
