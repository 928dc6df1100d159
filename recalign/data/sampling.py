"""Seeded negative sampling and sampled candidate lists (docs/metrics.md §3, `loo_sampled100`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from recalign.data.dataset import Dataset, UserSequences
from recalign.errors import DataError
from recalign.io import atomic_path

# Users per sampling chunk; fixed so that the same seed gives the same negatives on every machine.
_CHUNK_USERS = 4096


def _as_users(users: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(users), dtype=torch.long).reshape(-1)


def _sorted_keys(rows: torch.Tensor, cols: torch.Tensor, n_items: int) -> torch.Tensor:
    """Sorted unique (row, item) keys row * n_items + item, for membership tests by searchsorted."""
    return torch.unique(rows * n_items + cols)


def _contains(sorted_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, keys).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[pos] == keys


def first_in_row(draws: torch.Tensor) -> torch.Tensor:
    """True where a value appears for the first time in its row (left to right)."""
    values, order = torch.sort(draws, dim=1, stable=True)  # stable: equal values keep left-to-right order
    first_sorted = torch.ones_like(values, dtype=torch.bool)
    first_sorted[:, 1:] = values[:, 1:] != values[:, :-1]
    first = torch.empty_like(first_sorted)
    first.scatter_(1, order, first_sorted)
    return first


def sample_negatives(
    dataset_or_n_items: Dataset | int,
    history: UserSequences | None,
    users: Sequence[int] | np.ndarray | torch.Tensor,
    n: int,
    seed: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """n distinct negatives per user, uniform among items the user never interacted with: LongTensor [U, n].

    history: the interactions that rule items out (pass `dataset.sequences()` for "never interacted anywhere";
             None with a Dataset means exactly that).
    exclude: optional LongTensor [U, m] of further items to rule out per user (-1 = none), e.g. the targets.
    Same seed, users, history and n -> the same negatives. Rejection sampling: i.i.d. uniform draws over the
    catalog, dropping history items and repeats, keep the first n - a uniform draw without replacement.
    """
    if isinstance(dataset_or_n_items, Dataset):
        n_items = dataset_or_n_items.n_items
        if history is None:
            history = dataset_or_n_items.sequences()
    else:
        n_items = int(dataset_or_n_items)
    if history is None:
        raise DataError("sample_negatives needs a history (or a Dataset to take it from)", field="history")
    users = _as_users(users)
    generator = torch.Generator().manual_seed(int(seed))
    out = torch.empty((len(users), n), dtype=torch.long)
    if n == 0 or len(users) == 0:
        return out
    for start in range(0, len(users), _CHUNK_USERS):
        batch = users[start:start + _CHUNK_USERS]
        rows, cols = history.mask_coordinates(batch.numpy())
        if exclude is not None:
            extra = exclude[start:start + _CHUNK_USERS]
            valid = extra >= 0
            ex_rows = torch.arange(len(batch)).unsqueeze(1).expand_as(extra)[valid]
            rows, cols = torch.cat([rows, ex_rows]), torch.cat([cols, extra[valid]])
        keys = _sorted_keys(rows, cols, n_items)
        banned = torch.bincount(keys // n_items, minlength=len(batch))
        allowed = n_items - banned
        short = torch.nonzero(allowed < n).flatten()
        if len(short):
            u = int(batch[short[0]])
            raise DataError(f"user {u} has only {int(allowed[short[0]])} items never interacted with; "
                            f"cannot draw {n} negatives", field="n_negatives")
        out[start:start + len(batch)] = _draw_chunk(keys, allowed, n, n_items, generator)
    return out


def _draw_chunk(keys: torch.Tensor, allowed: torch.Tensor, n: int, n_items: int,
                generator: torch.Generator) -> torch.Tensor:
    """Uniform draws without replacement for one chunk of users (row-local keys row * n_items + item)."""
    result = torch.empty((len(allowed), n), dtype=torch.long)
    # Expected i.i.d. draws to collect n distinct allowed items is about n * n_items / allowed.
    need = n * n_items / allowed.double()
    dense = need * 1.5 >= n_items
    if dense.any():
        # Few allowed items: random keys over the whole catalog, banned items last, n smallest keys.
        rows = torch.nonzero(dense).flatten()
        noise = torch.rand((len(rows), n_items), generator=generator)
        local = torch.searchsorted(rows, keys // n_items).clamp_(max=len(rows) - 1)
        hit = rows[local] == keys // n_items
        noise[local[hit], keys[hit] % n_items] = 2.0
        result[rows] = torch.topk(noise, n, dim=1, largest=False, sorted=True).indices
    pending = torch.nonzero(~dense).flatten()
    factor = 1.5
    first = True
    while len(pending):
        # First round sized for the typical row; the few rows that come up short retry with wider draws.
        target = need[pending].median() if first else need[pending].max()
        width = max(int(float(target) * factor) + 16, n)
        draws = torch.randint(0, n_items, (len(pending), width), generator=generator)
        ok = ~_contains(keys, pending.unsqueeze(1) * n_items + draws) & first_in_row(draws)
        done = ok.sum(dim=1) >= n
        take = ok & (torch.cumsum(ok, dim=1) <= n)
        result[pending[done]] = draws[done][take[done]].view(-1, n)
        pending = pending[~done]
        factor *= 1.5
        first = False
    return result


def candidate_lists(
    dataset_or_n_items: Dataset | int,
    history: UserSequences | None,
    users: Sequence[int] | np.ndarray | torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    n: int,
    seed: int,
) -> torch.Tensor:
    """Per user [target, n negatives]: LongTensor [U, 1 + n]; negatives never include the target."""
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1, 1)
    negatives = sample_negatives(dataset_or_n_items, history, users, n, seed, exclude=targets)
    return torch.cat([targets, negatives], dim=1)


def save_candidates(path: str | os.PathLike, users: torch.Tensor, candidates: torch.Tensor, seed: int) -> Path:
    """Write users, candidate lists and the seed to a .pt file (atomically)."""
    out = Path(path)
    with atomic_path(out) as tmp:
        torch.save({"users": _as_users(users), "candidates": candidates.long(),
                    "seed": torch.tensor(int(seed))}, tmp)
    return out


def load_candidates(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Read (users, candidates, seed) written by `save_candidates`."""
    try:
        data = torch.load(Path(path), weights_only=True)
        return data["users"], data["candidates"], int(data["seed"])
    except (OSError, KeyError, RuntimeError) as exc:
        raise DataError(f"cannot read candidate lists: {exc}", path=path) from None
