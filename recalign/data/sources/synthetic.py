"""Synthetic interactions with known structure: the embedded default for the demo and the tests.

Structure a good recommender should find:
- popularity skew: item base weights follow a Zipf law (`popularity_skew`);
- category preferences: each user favours `favourite_categories` of the `n_categories` (weight `category_affinity`);
- sequential dynamics: every item has a fixed successor in its own category; after consuming an item the user
  moves to its successor with probability `follow_prob` (unless already seen).
No user consumes an item twice. Timestamps interleave users globally, so temporal splits are meaningful too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.sources import Source, SourceConfig
from recalign.errors import ConfigError

_ADJECTIVES = ["Red", "Silent", "Golden", "Hidden", "Broken", "Lucky", "Frozen", "Wild", "Quiet", "Electric",
               "Midnight", "Crimson", "Paper", "Iron", "Velvet", "Hollow"]
_NOUNS = ["Ocean", "Garden", "Empire", "River", "Mirror", "Engine", "Forest", "Harbor", "Comet", "Lantern",
          "Castle", "Desert", "Orchard", "Signal", "Canyon", "Island"]
_CATEGORIES = ["Mystery", "Romance", "Science Fiction", "Fantasy", "History", "Comedy", "Horror", "Travel",
               "Cooking", "Poetry", "Biography", "Music"]


class SyntheticSourceConfig(SourceConfig):
    """Size and structure of the generated data."""

    n_users: int = Field(1000, ge=2, description="number of users")
    n_items: int = Field(300, ge=4, description="catalog size")
    n_categories: int = Field(8, ge=1, le=len(_CATEGORIES), description="number of item categories")
    min_length: int = Field(10, ge=3, description="shortest user sequence")
    max_length: int = Field(40, ge=3, description="longest user sequence")
    popularity_skew: float = Field(1.0, ge=0.0, description="Zipf exponent of item popularity (0 = uniform)")
    favourite_categories: int = Field(2, ge=1, description="categories each user prefers")
    category_affinity: float = Field(0.8, ge=0.0, le=1.0, description="share of picks from favourite categories")
    follow_prob: float = Field(0.6, ge=0.0, le=1.0, description="probability of moving to the item's successor")
    seed: int = Field(0, description="random seed; same seed -> identical dataset")


def generate_synthetic(options: SyntheticSourceConfig) -> Dataset:
    """Generate the dataset described by `options` (vectorised over users, one step per sequence position).

    The draws happen in a fixed order (catalog, preferences, lengths, sequences, timestamps), so the same seed
    gives the same dataset.
    """
    o = options
    if o.min_length > o.max_length:
        raise ConfigError(f"synthetic: min_length ({o.min_length}) > max_length ({o.max_length})")
    if o.max_length >= o.n_items:
        raise ConfigError(f"synthetic: max_length ({o.max_length}) must be < n_items ({o.n_items})")
    rng = np.random.default_rng(o.seed)
    gen = torch.Generator().manual_seed(o.seed)

    item_category, popularity, successor = _catalog_structure(o, rng)
    is_favourite, base = _user_preferences(o, rng, item_category, popularity)
    lengths = rng.integers(o.min_length, o.max_length + 1, size=o.n_users)
    sequence = _sample_sequences(o, rng, gen, base, successor)
    interactions = _interaction_frame(o, rng, sequence, lengths, is_favourite, item_category)
    return build_dataset(interactions, items=_item_frame(o.n_items, item_category), name="synthetic",
                         source="synthetic", options=o.model_dump())


def _catalog_structure(o: SyntheticSourceConfig, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(category of each item, Zipf popularity in a random item order, successor of each item: a cycle through
    each category's items)."""
    item_category = rng.integers(0, o.n_categories, size=o.n_items)
    item_category[: o.n_categories] = np.arange(o.n_categories)  # every category has an item
    popularity = 1.0 / np.arange(1, o.n_items + 1) ** o.popularity_skew
    popularity = popularity[rng.permutation(o.n_items)]
    successor = np.empty(o.n_items, dtype=np.int64)  # a cycle through each category's items
    for c in range(o.n_categories):
        members = rng.permutation(np.flatnonzero(item_category == c))
        successor[members] = np.roll(members, -1)
    return item_category, popularity, successor


def _user_preferences(o: SyntheticSourceConfig, rng: np.random.Generator, item_category: np.ndarray,
                      popularity: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """(favourite-category mask [U, C], base sampling weight of every item for every user [U, I])."""
    favourites = np.stack([rng.choice(o.n_categories, size=min(o.favourite_categories, o.n_categories),
                                      replace=False) for _ in range(o.n_users)])
    is_favourite = np.zeros((o.n_users, o.n_categories), dtype=bool)
    np.put_along_axis(is_favourite, favourites, True, axis=1)
    n_fav = is_favourite.sum(1, keepdims=True)
    category_weight = np.where(is_favourite, o.category_affinity / n_fav,
                               (1 - o.category_affinity) / np.maximum(o.n_categories - n_fav, 1))
    base = torch.from_numpy(category_weight[:, item_category] * popularity[None, :]).float()  # [U, I]
    return is_favourite, base


def _sample_sequences(o: SyntheticSourceConfig, rng: np.random.Generator, gen: torch.Generator,
                      base: torch.Tensor, successor: np.ndarray) -> np.ndarray:
    """Item sequences [U, max_length]: at each step the successor of the last item (with probability follow_prob,
    when unseen) or a draw from the base weights over the unseen items."""
    seen = torch.zeros(o.n_users, o.n_items, dtype=torch.bool)
    sequence = np.full((o.n_users, o.max_length), -1, dtype=np.int64)
    succ = torch.from_numpy(successor)
    follow = torch.from_numpy(rng.random((o.n_users, o.max_length)) < o.follow_prob)
    rows = torch.arange(o.n_users)
    current = None
    for t in range(o.max_length):
        weights = base.masked_fill(seen, 0.0)
        sampled = torch.multinomial(weights, 1, generator=gen).squeeze(1)
        if current is None:
            chosen = sampled
        else:
            nxt = succ[current]
            take_next = follow[:, t] & ~seen[rows, nxt]
            chosen = torch.where(take_next, nxt, sampled)
        seen[rows, chosen] = True
        sequence[:, t] = chosen.numpy()
        current = chosen
    return sequence


def _interaction_frame(o: SyntheticSourceConfig, rng: np.random.Generator, sequence: np.ndarray,
                       lengths: np.ndarray, is_favourite: np.ndarray, item_category: np.ndarray) -> pd.DataFrame:
    """(user, item, timestamp, rating) rows of the first `lengths` items of each sequence; timestamps start at a
    random time per user with a random gap, ratings are 5 for favourite-category items and 3 otherwise."""
    positions = np.arange(o.max_length)[None, :]
    keep = positions < lengths[:, None]
    start = rng.integers(0, 1_000_000, size=o.n_users)
    gap = rng.integers(1_000, 5_000, size=o.n_users)
    timestamps = start[:, None] + positions * gap[:, None]
    user_index = np.broadcast_to(np.arange(o.n_users)[:, None], sequence.shape)
    ratings = np.where(is_favourite[user_index, item_category[np.maximum(sequence, 0)]], 5.0, 3.0)
    return pd.DataFrame({
        "user": [f"u{u}" for u in user_index[keep]],
        "item": [f"i{i}" for i in sequence[keep]],
        "timestamp": timestamps[keep],
        "rating": ratings[keep],
    })


def _item_frame(n_items: int, item_category: np.ndarray) -> pd.DataFrame:
    """The catalog: generated titles ("Adjective Noun N"), one category each, and a short text."""
    names = [f"{_ADJECTIVES[i % 16]} {_NOUNS[(i // 16) % 16]} {i // 256 + 1}" for i in range(n_items)]
    return pd.DataFrame({
        "item": [f"i{i}" for i in range(n_items)],
        "title": names,
        "categories": [[_CATEGORIES[c]] for c in item_category],
        "text": [f"{n}. A {_CATEGORIES[c].lower()} title." for n, c in zip(names, item_category)],
    })


def _load(raw: Path | None, options: SyntheticSourceConfig) -> Dataset:
    return generate_synthetic(options)


SYNTHETIC = Source(
    name="synthetic",
    options=SyntheticSourceConfig,
    load=_load,
    description="seeded synthetic catalog + users with popularity skew, category preferences, successor dynamics",
    needs_raw=False,
)
