"""Dataset sources: one module per raw format, each turning files as originally distributed into a Dataset.

`SOURCES` maps a source name to its `Source`; each module is imported only when its source is looked up.
To add a source: write `recalign/data/sources/<name>.py` with an options model and a `load(raw, options)` function,
wrap them in a `Source`, and add a "module:attribute" line to `_REGISTRY`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from recalign.data.dataset import Dataset
from recalign.errors import ConfigError, DataError


class SourceConfig(BaseModel):
    """Base of every source's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Source:
    """A raw format: its options schema and the function that reads it."""

    name: str
    options: type[SourceConfig]
    load: Callable[[Path | None, SourceConfig], Dataset]
    description: str
    needs_raw: bool = True


_REGISTRY: dict[str, str] = {
    "movielens-100k": "recalign.data.sources.movielens:MOVIELENS_100K",
    "movielens-1m": "recalign.data.sources.movielens:MOVIELENS_1M",
    "amazon2014": "recalign.data.sources.amazon:AMAZON_2014",
    "amazon2018": "recalign.data.sources.amazon:AMAZON_2018",
    "unisrec": "recalign.data.sources.unisrec:UNISREC",
    "s3rec": "recalign.data.sources.s3rec:S3REC",
    "goodreads-sprec": "recalign.data.sources.goodreads:GOODREADS_SPREC",
    "reclmgen-pickle": "recalign.data.sources.seedformat:RECLMGEN",
    "recgpt-pickle": "recalign.data.sources.seedformat:RECGPT",
    "synthetic": "recalign.data.sources.synthetic:SYNTHETIC",
    "tabular": "recalign.data.sources.tabular:TABULAR",
    "p5-text": "recalign.data.sources.textmaps:P5_TEXT",
    "lcrec": "recalign.data.sources.textmaps:LCREC",
    "recbole": "recalign.data.sources.textmaps:RECBOLE",
}

# Where each source's raw files come from, for the error a missing --raw path gives (a fresh clone has no data).
_ORIGINS: dict[str, str] = {
    "amazon2014": "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html (5-core reviews + metadata)",
    "amazon2018": "https://nijianmo.github.io/amazon/ (5-core reviews + metadata)",
    "unisrec": "the UniSRec repository's processed downloads (RUCAIBox/UniSRec)",
    "s3rec": "the S3-Rec repository's data/ folder (RUCAIBox/CIKM2020-S3Rec)",
    "goodreads-sprec": "the SPRec repository (RegionCh/SPRec): data/Goodreads and eval/Goodreads",
    "reclmgen-pickle": "the RecLM-gen repository's data/ folder (Luuuk12321/RecLM-gen)",
    "recgpt-pickle": "the RecGPT repository's data/test/ folder (HKUDS/RecGPT)",
    "p5-text": "the TransRec repository's data/<name>/rec_data folder (Linxyhaha/TransRec)",
    "lcrec": "an LC-Rec data folder: NAME.item.json + NAME.inter.json (RUCAIBox/LC-Rec, yuyq18/APAO)",
    "recbole": "RecBole atomic files, e.g. the LLMRank datasets (RUCAIBox/LLMRank llmrank/dataset)",
    "tabular": "your own interaction table",
}


class _LazySources(Mapping):
    """Source name -> Source, importing a source's module only when it is looked up (listing imports nothing)."""

    def __getitem__(self, name: str) -> Source:
        return get_source(name)

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY


SOURCES: Mapping[str, Source] = _LazySources()


def get_source(name: str) -> Source:
    """Resolve a source name; unknown names are config errors listing the choices."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown source '{name}'; choose one of: {', '.join(_REGISTRY)}")
    module, attribute = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def prepare_source(source_name: str, raw: str | Path | None = None, /, **options) -> Dataset:
    """Read raw files of source `source_name` (options validated against its schema) into a Dataset."""
    name = source_name
    source = get_source(name)
    try:
        opts = source.options(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise ConfigError(f"source '{name}': option '{loc}': {first.get('msg')}") from None
    if raw is not None:
        raw = Path(raw)
        if not raw.exists():
            raise DataError(f"no such file or directory; {missing_raw_hint(name)}", path=raw)
    elif source.needs_raw:
        raise ConfigError(f"source '{name}' needs --raw PATH (the folder or file as distributed)")
    return source.load(raw, opts)


def missing_raw_hint(name: str) -> str:
    """How to get source `name`'s raw files: a `recalign data download` command, or where they come from."""
    from recalign.data.download import DOWNLOADS

    if name in DOWNLOADS:
        return f"get the raw files with `recalign data download {name} --out DIR` and pass --raw DIR"
    origin = _ORIGINS.get(name)
    return f"no download is built in for '{name}': get the raw files from {origin}" if origin else \
        f"no download is built in for '{name}'"


def require_file(folder: Path, name: str) -> Path:
    """`folder/name` if it exists, else a DataError naming the missing file."""
    path = folder / name if folder.is_dir() else folder
    if not path.is_file():
        raise DataError(f"missing file '{name}'", path=folder)
    return path
