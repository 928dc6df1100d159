"""EASE (Steck, WWW 2019): a linear item-item model with a zero diagonal, in closed form.

B minimises ||X − XB||² + λ||B||² subject to diag(B) = 0, for the binary user-item matrix X. With
P = (XᵀX + λI)⁻¹ the solution is B = I − P·diag(1/diag(P)), i.e. B_ij = −P_ij / P_jj off the diagonal; a user's
scores are x_u B (B stored in float32).

The inverse is a Cholesky one, in float32 when that is accurate: the Gershgorin bound on the condition number of
XᵀX + λI, (largest row sum of XᵀX + λ) / λ, is at most `FLOAT32_MAX_CONDITION` (so float32's rounding of 6e-8 moves
B by well under 1e-3 of its scale; on a synthetic catalog of ML-1M's size, 3,696 items, the float32 and float64
top-10 lists were the same for every λ from 1 to 500), else in float64. The dense n_items × n_items matrices limit
the catalog: fitting needs about 8·n_items² bytes at its peak in float32 (7 GB at 30,000 items), twice that in
float64, so a catalog over `max_items` is refused before anything is allocated.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from recalign.data.dataset import Dataset, UserSequences
from recalign.errors import ConfigError
from recalign.teachers.base import Recommender, TeacherConfig
from recalign.teachers.itemknn import cooccurrence_blocks, history_matrix, interaction_pairs
from recalign.threads import uses_config_threads


class EASEConfig(TeacherConfig):
    """Settings of EASE (`seed` is accepted for a uniform interface: fitting draws nothing)."""

    l2: float = Field(500.0, gt=0, description="λ, the L2 penalty on B (500: the paper's typical value)")
    max_items: int = Field(30000, ge=1, description="largest catalog to fit: B and the inverse are dense "
                           "n_items × n_items matrices (8·n_items² bytes at the peak of fit, 16 in float64)")


FLOAT32_MAX_CONDITION = 1e4  # above this bound on cond(XᵀX + λI) the inverse is taken in float64


def ease_weights(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int, l2: float) -> torch.Tensor:
    """B = I − P·diag(1/diag(P)) with P = (XᵀX + l2·I)⁻¹ for the binary matrix X of (users, items) pairs, as float32.

    The inverse is float32 when (largest row sum of XᵀX + l2) / l2, a bound on the condition number, is at most
    FLOAT32_MAX_CONDITION, else float64. Each matrix is dropped once used: at most two n_items² ones are alive.
    """
    gram = torch.zeros(n_items, n_items)  # co-occurrence counts: exact in float32
    for start, end, counts in cooccurrence_blocks(users, items, n_users, n_items):
        gram[start:end] = counts
    bound = (float(gram.sum(1).max()) + l2) / l2
    gram = gram.to(torch.float32 if bound <= FLOAT32_MAX_CONDITION else torch.float64)
    gram.diagonal().add_(l2)
    factor = torch.linalg.cholesky(gram)  # gram + l2·I is symmetric positive definite (l2 > 0)
    del gram
    inverse = torch.cholesky_inverse(factor)
    del factor
    inverse.div_(-inverse.diagonal().clone())  # column j divided by -P_jj
    inverse.diagonal().zero_()
    return inverse.float()


class EASE(Recommender):
    """Embarrassingly shallow autoencoder; `weights_` is B [n_items, n_items] (float32, zero diagonal)."""

    name = "ease"
    Config = EASEConfig

    @uses_config_threads
    def fit(self, dataset: Dataset, train: pd.DataFrame, valid: pd.DataFrame | None = None,
            progress: bool = True, valid_history: pd.DataFrame | None = None) -> "EASE":
        """B from the training interactions in closed form (`valid`, `valid_history` and `progress` are accepted
        for a uniform interface: there are no epochs)."""
        cfg = self.config
        n_items = dataset.n_items
        if n_items > cfg.max_items:
            raise ConfigError(f"ease: the catalog has {n_items} items, more than max_items={cfg.max_items} (EASE "
                              f"builds dense {n_items}x{n_items} matrices); raise max_items or use itemknn")
        self._remember_catalog(dataset)
        users, items = interaction_pairs(train, n_items)
        self.weights_ = ease_weights(users, items, dataset.n_users, n_items, cfg.l2)
        return self

    @uses_config_threads
    def score(self, users: np.ndarray | torch.Tensor, history: UserSequences) -> torch.Tensor:
        """x_u B for each user's binary history x_u."""
        self._check_fitted()
        return history_matrix(users, history, self.n_items_) @ self.weights_

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights_}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.weights_ = tensors["weights"]
