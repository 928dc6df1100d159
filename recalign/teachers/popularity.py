"""Most-popular baseline: every user gets the items with the most training interactions (ties: lower item id)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from recalign.data.dataset import Dataset, UserSequences
from recalign.teachers.base import Recommender, TeacherConfig


class PopularityConfig(TeacherConfig):
    """Popularity has nothing to tune; `seed` and `threads` are kept for a uniform interface."""


class Popularity(Recommender):
    """Scores every item by its number of training interactions, the same for every user."""

    name = "popularity"
    Config = PopularityConfig

    def fit(self, dataset: Dataset, train: pd.DataFrame, valid: pd.DataFrame | None = None,
            progress: bool = True, valid_history: pd.DataFrame | None = None) -> "Popularity":
        """Count training interactions per item (`valid`, `valid_history` are accepted for a uniform interface)."""
        self._remember_catalog(dataset)
        counts = np.bincount(train["item_id"].to_numpy(dtype=np.int64), minlength=dataset.n_items)
        self.counts_ = torch.from_numpy(counts.astype(np.float32))
        return self

    def score(self, users: np.ndarray | torch.Tensor, history: UserSequences) -> torch.Tensor:
        """The count vector repeated for each user; topk breaks ties by ascending item id."""
        self._check_fitted()
        return self.counts_.unsqueeze(0).expand(len(users), -1).clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts_}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.counts_ = tensors["counts"]
