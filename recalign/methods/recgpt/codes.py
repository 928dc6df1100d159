"""Semantic item codes: one row of per-position code values per catalog item, unique across the catalog.

The shared contract of the genrec blocks: the tokenizer (fsq.py) writes `ItemCodes`, the decoder and the beam
search read it. Position c of an item holds a value in [0, sizes[c]); as a token it is `offsets[c] + value`, so
every position has its own token range and the vocabulary is `sum(sizes)` codes plus one pad (`pad_id`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recalign.errors import DataError, writing
from recalign.io import atomic_path

__all__ = ["ItemCodes", "disambiguate", "collision_rate"]

FORMAT = "recalign.methods.recgpt.ItemCodes/1"


@dataclass(frozen=True)
class ItemCodes:
    """Per-item code rows `codes` [n_items, n_positions] with per-position value ranges `sizes`."""

    codes: torch.Tensor
    sizes: tuple[int, ...]
    collision_rate: float = 0.0
    offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        codes = torch.as_tensor(self.codes)
        if codes.dim() != 2 or codes.dtype != torch.long:
            raise DataError(f"item codes: expected a LongTensor [n_items, n_positions], got {codes.dtype} "
                            f"{tuple(codes.shape)}")
        sizes = tuple(int(s) for s in self.sizes)
        if len(sizes) != codes.shape[1] or any(s < 1 for s in sizes):
            raise DataError(f"item codes: sizes {sizes} do not match {codes.shape[1]} positions (each >= 1)")
        if codes.numel() and ((codes < 0).any() or (codes >= torch.tensor(sizes)).any()):
            raise DataError(f"item codes: a value lies outside [0, size) for sizes {sizes}")
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "collision_rate", float(self.collision_rate))
        object.__setattr__(self, "offsets", tuple(offsets))

    @property
    def n_items(self) -> int:
        """Number of catalog items."""
        return int(self.codes.shape[0])

    @property
    def n_positions(self) -> int:
        """Code positions (tokens) per item."""
        return int(self.codes.shape[1])

    @property
    def vocab_size(self) -> int:
        """All code tokens plus the pad token."""
        return sum(self.sizes) + 1

    @property
    def pad_id(self) -> int:
        """Token id of padding: the last vocabulary row."""
        return sum(self.sizes)

    def token_ids(self) -> torch.Tensor:
        """Token ids [n_items, n_positions]: value v at position c is token offsets[c] + v."""
        return self.codes + torch.tensor(self.offsets, dtype=torch.long)

    def is_unique(self) -> bool:
        """Whether no two items share a code row."""
        return torch.unique(self.codes, dim=0).shape[0] == self.n_items

    def save(self, path: str | Path) -> Path:
        """Write codes, sizes and collision rate as one safetensors file (atomic)."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "sizes": json.dumps(list(self.sizes)), "collision_rate": repr(self.collision_rate)}
        target = Path(path)
        with writing(target), atomic_path(target) as tmp:
            save_file({"codes": self.codes.contiguous()}, str(tmp), metadata=meta)
        return target

    @classmethod
    def load(cls, path: str | Path) -> "ItemCodes":
        """Read codes written by `save`."""
        meta, tensors = read_safetensors(path, "item-codes", FORMAT)
        return cls(codes=tensors["codes"], sizes=tuple(json.loads(meta["sizes"])),
                   collision_rate=float(meta["collision_rate"]))


def collision_rate(codes: torch.Tensor) -> float:
    """Share of items whose code row is also another item's row (0.0 when all are distinct)."""
    if codes.shape[0] == 0:
        return 0.0
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).double().mean())


def disambiguate(codes: torch.Tensor, sizes: tuple[int, ...]) -> ItemCodes:
    """Append a position numbering items that share a code row (0, 1, ... in item order), making every row unique.

    The new position's size is the largest group of items sharing a row (at least 1).
    """
    codes = torch.as_tensor(codes, dtype=torch.long)
    n = codes.shape[0]
    if n == 0:
        return ItemCodes(torch.zeros(0, codes.shape[1] + 1, dtype=torch.long), (*sizes, 1), 0.0)
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)  # items grouped by row, item order inside a group
    group_start = torch.cumsum(counts, 0) - counts  # first slot of each group in `order`
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - group_start[inverse[order]]
    rate = float((counts[inverse] > 1).double().mean())
    return ItemCodes(torch.cat([codes, rank[:, None]], 1), (*sizes, int(counts.max())), rate)


def read_safetensors(path: str | Path, what: str, expected_format: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file that recalign wrote with `format: expected_format`; a missing,
    damaged or foreign file is a DataError naming `what` and the path."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise DataError(f"no such {what} file", path=path) from None
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise DataError(f"not an {what} safetensors file ({type(exc).__name__})", path=path) from None
    if meta.get("format") != expected_format:
        raise DataError(f"expected format {expected_format!r}, got {meta.get('format')!r}", path=path)
    return meta, tensors
