"""A recipe's data: prepare a source (or load a saved Dataset), cache it in the run folder, and split it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from recalign.config import DataConfig, SplitConfig
from recalign.data.dataset import Dataset
from recalign.errors import ConfigError, RecalignError
from recalign.io import read_json, write_json

if TYPE_CHECKING:
    from recalign.data.split import Split

def _raw_signature(raw: str | None) -> list:
    """Names, sizes and mtimes of the raw files, to notice when a cached preparation is stale."""
    if raw is None:
        return []
    path = Path(raw)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        raise RecalignError(f"{raw}: no such file or folder")
    return [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def prepare_data(spec: DataConfig, cache_dir: Path | None = None) -> Dataset:
    """The recipe's dataset: load `path`, or prepare `source` from `raw` (reusing `cache_dir` when unchanged).

    Only reads the cache; `save_prepared` writes it once the run folder exists.
    """
    if spec.path is not None:
        folder = Path(spec.path)
        if not folder.exists():
            raise RecalignError(f"{folder}: no such dataset folder")
        return Dataset.load(folder)
    from recalign.data.sources import missing_raw_hint, prepare_source

    if spec.raw is not None and not Path(spec.raw).exists():  # say how to get the data (a fresh clone has none)
        raise RecalignError(f"{spec.raw}: no such file or folder; {missing_raw_hint(spec.source)}")
    key = prepare_key(spec)
    if cache_dir is not None and (cache_dir / "dataset.json").is_file() and (cache_dir / "prepare.json").is_file():
        try:
            if read_json(cache_dir / "prepare.json") == key:
                return Dataset.load(cache_dir)
        except (json.JSONDecodeError, RecalignError):
            pass  # a damaged cache is simply rebuilt
    return prepare_source(spec.source, spec.raw, **spec.options)


def prepare_key(spec: DataConfig) -> dict:
    """What a prepared dataset depends on: source, raw path, options and the raw files' sizes/mtimes."""
    key = {"source": spec.source, "raw": str(Path(spec.raw).resolve()) if spec.raw else None,
           "options": spec.options, "files": _raw_signature(spec.raw)}
    return json.loads(json.dumps(key, default=str))


def prepare_cached(spec: DataConfig, cache_dir: Path) -> Dataset:
    """Prepare (or load) a dataset and keep a source's preparation in `cache_dir` for the next call."""
    dataset = prepare_data(spec, cache_dir=cache_dir)
    if spec.source is not None and not cache_is_fresh(spec, cache_dir):
        save_prepared(dataset, spec, cache_dir)
    return dataset


def save_prepared(dataset: Dataset, spec: DataConfig, cache_dir: Path) -> None:
    """Cache a prepared dataset in a run folder so re-runs skip preparation."""
    dataset.save(cache_dir)
    write_json(cache_dir / "prepare.json", prepare_key(spec))


def make_split(dataset: Dataset, spec: SplitConfig, seed: int) -> tuple[Dataset, "Split"]:
    """Apply the optional k-core filter, then split; returns the (possibly filtered) dataset and the split."""
    from recalign.data import split as splits

    if spec.kcore is not None:
        k_user, k_item = (spec.kcore, spec.kcore) if isinstance(spec.kcore, int) else spec.kcore
        dataset = splits.kcore_filter(dataset, k_user, k_item)
    if spec.kind == "leave_one_out":
        if spec.fractions is not None:
            raise ConfigError("split.fractions: leave_one_out takes no fractions")
        return dataset, splits.leave_one_out_split(dataset)
    if spec.kind == "global_temporal":
        fractions = tuple(spec.fractions) if spec.fractions is not None else (0.6, 0.1, 0.1, 0.2)
        if len(fractions) != 4:
            raise ConfigError("split.fractions: global_temporal takes 4 fractions (train1, train2, valid, test)")
        return dataset, splits.global_temporal_split(dataset, fractions=fractions)
    if spec.kind == "cold_start":
        if spec.fractions is not None:
            raise ConfigError("split.fractions: cold_start takes no fractions (it takes window: [min, max])")
        low, high = spec.window or (2, 4)
        return dataset, splits.cold_start_split(dataset, low, high, seed=spec.seed if spec.seed is not None else seed)
    if spec.window is not None:
        raise ConfigError(f"split.window: only cold_start takes a window, not {spec.kind}")
    fractions = tuple(spec.fractions) if spec.fractions is not None else (0.8, 0.1, 0.1)
    if len(fractions) != 3:
        raise ConfigError("split.fractions: random takes 3 fractions (train, valid, test)")
    return dataset, splits.random_split(dataset, fractions=fractions, seed=spec.seed if spec.seed is not None else seed)


def absolute_data_paths(spec: DataConfig) -> DataConfig:
    """The data spec with `path` and `raw` made absolute, so a run folder does not depend on the working directory."""
    update = {key: str(Path(value).expanduser().resolve()) for key in ("path", "raw")
              if (value := getattr(spec, key)) is not None}
    return spec.model_copy(update=update)


def cache_is_fresh(spec: DataConfig, cache_dir: Path) -> bool:
    try:
        return (cache_dir / "dataset.json").is_file() and \
            read_json(cache_dir / "prepare.json") == prepare_key(spec)
    except (OSError, json.JSONDecodeError):
        return False
