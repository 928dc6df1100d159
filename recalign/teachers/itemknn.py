"""ItemKNN: item-item cosine similarity with shrinkage over the binary user-item matrix, cut to k neighbours.

sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i|) sqrt(|U_j|) + shrink), with U_i the training users of item i. Each item j
keeps its k most similar other items (ties: lower item id), and a user's score of item j sums sim(h, j) over the
history items h among them: score(u) = x_u S, x_u the binary history. This is RecBole's ItemKNN (a target item's
neighbourhood, Aiolli 2013's cosine with shrinkage) with its defaults k = 100, shrink = 0.

The co-occurrence counts come from sparse matrix products over blocks of items (no loop over users or items); the
kept similarities are stored as [n_items, k] neighbour ids and weights.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from recalign.data.dataset import Dataset, UserSequences
from recalign.eval.ranking import topk_items
from recalign.teachers.base import Recommender, TeacherConfig
from recalign.threads import uses_config_threads

BLOCK_ENTRIES = 1 << 22  # dense co-occurrence block of at most this many floats (16 MB)


class ItemKNNConfig(TeacherConfig):
    """Settings of ItemKNN (`seed` is accepted for a uniform interface: fitting draws nothing)."""

    k: int = Field(100, ge=1, description="neighbours kept per item (RecBole's default, 100)")
    shrink: float = Field(0.0, ge=0, description="added to the cosine's denominator: damps the similarity of item "
                          "pairs with few users (RecBole's default, 0)")
    similarity: Literal["cosine"] = Field("cosine", description="similarity measure (only cosine for now)")


def interaction_pairs(train: pd.DataFrame, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct (user, item) pairs of `train` as two LongTensors, sorted by user then item (binary matrix)."""
    users = train["user_id"].to_numpy(dtype=np.int64)
    items = train["item_id"].to_numpy(dtype=np.int64)
    keys = torch.unique(torch.from_numpy(users * n_items + items))
    return keys // n_items, keys % n_items


def cooccurrence_blocks(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int
                        ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, counts) per block of items: counts[b, i] = users shared by item start+b and item i (float32).

    Each block is one sparse product X[:, start:end]ᵀ X of the binary user-item matrix X; counts stay exact
    integers in float32 up to 2^24 users.
    """
    block = max(1, BLOCK_ENTRIES // max(1, n_items))
    ones = torch.ones(len(users))
    matrix = torch.sparse_coo_tensor(torch.stack([users, items]), ones, (n_users, n_items),
                                     check_invariants=False).coalesce()
    with warnings.catch_warnings():  # torch's sparse product goes through its (beta) CSR layout and says so
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for start in range(0, n_items, block):
            end = min(n_items, start + block)
            inside = (items >= start) & (items < end)
            part = torch.sparse_coo_tensor(torch.stack([items[inside] - start, users[inside]]), ones[inside],
                                           (end - start, n_users), check_invariants=False)
            yield start, end, torch.sparse.mm(part, matrix).to_dense()


def history_matrix(users: np.ndarray | torch.Tensor, history: UserSequences, n_items: int) -> torch.Tensor:
    """Binary FloatTensor [len(users), n_items]: 1 where the item is in the user's history (repeats count once)."""
    users = np.asarray(users, dtype=np.int64)
    rows, cols = history.mask_coordinates(users)
    x = torch.zeros(len(users), n_items)
    x[rows, cols] = 1.0
    return x


class ItemKNN(Recommender):
    """Item-based k-nearest neighbours; `neighbours_` / `weights_` [n_items, k] hold each item's kept neighbours."""

    name = "itemknn"
    Config = ItemKNNConfig

    @uses_config_threads
    def fit(self, dataset: Dataset, train: pd.DataFrame, valid: pd.DataFrame | None = None,
            progress: bool = True, valid_history: pd.DataFrame | None = None) -> "ItemKNN":
        """Cosine similarities with shrinkage from the training co-occurrences, each item's top-k kept (`valid`,
        `valid_history` and `progress` are accepted for a uniform interface: there are no epochs)."""
        cfg = self.config
        self._remember_catalog(dataset)
        n_items = dataset.n_items
        users, items = interaction_pairs(train, n_items)
        norms = torch.bincount(items, minlength=n_items).float().sqrt()
        k = min(cfg.k, n_items)
        neighbours = torch.zeros(n_items, k, dtype=torch.long)
        weights = torch.zeros(n_items, k)
        for start, end, counts in cooccurrence_blocks(users, items, dataset.n_users, n_items):
            denominator = norms[start:end].unsqueeze(1) * norms.unsqueeze(0) + cfg.shrink
            sim = torch.where(denominator > 0, counts / denominator.clamp_min(1e-30), 0.0)
            rows = torch.arange(end - start)
            sim[rows, rows + start] = -torch.inf  # an item is not its own neighbour
            ids, values = topk_items(sim, k)
            neighbours[start:end], weights[start:end] = ids, values.clamp_min(0.0)  # -inf only when k = n_items
        self.neighbours_, self.weights_ = neighbours, weights
        self._matrix = None
        return self

    def similarity_matrix(self) -> torch.Tensor:
        """Dense [n_items, n_items] S: S[i, j] = sim(i, j) when i is one of j's k neighbours, else 0."""
        self._check_fitted()
        return self._neighbour_matrix().to_dense().T.contiguous()

    def _neighbour_matrix(self) -> torch.Tensor:
        """Sparse CSR Sᵀ [n_items, n_items] (row j: j's neighbours), built once from neighbours_ / weights_."""
        if getattr(self, "_matrix", None) is None:
            n_items, k = self.neighbours_.shape
            keep = self.weights_.flatten() != 0
            rows = torch.arange(n_items).repeat_interleave(k)[keep]
            indices = torch.stack([rows, self.neighbours_.flatten()[keep]])
            matrix = torch.sparse_coo_tensor(indices, self.weights_.flatten()[keep], (n_items, self.n_items_),
                                             check_invariants=False).coalesce()
            with warnings.catch_warnings():  # CSR times a dense matrix is the fastest product (9x COO's)
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                self._matrix = matrix.to_sparse_csr()
        return self._matrix

    @uses_config_threads
    def score(self, users: np.ndarray | torch.Tensor, history: UserSequences) -> torch.Tensor:
        """x_u S for each user's binary history x_u (users without history score 0 everywhere)."""
        self._check_fitted()
        x = history_matrix(users, history, self.n_items_)
        return (self._neighbour_matrix() @ x.T).T.contiguous()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"neighbours": self.neighbours_, "weights": self.weights_}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.neighbours_, self.weights_ = tensors["neighbours"], tensors["weights"]
        self._matrix = None
