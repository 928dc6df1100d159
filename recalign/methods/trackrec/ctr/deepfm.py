"""DeepFM (Guo et al., IJCAI 2017): first-order + FM pairwise term + MLP; optional knowledge vector."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from recalign.methods.trackrec.ctr.layers import CTRInputs, mean_history, mlp

__all__ = ["DeepFM"]


class DeepFM(nn.Module):
    """Fields: candidate, mean history, user features. The knowledge vector joins the MLP input and a linear term."""

    def __init__(self, n_items: int, feature_sizes: Sequence[int], embed_dim: int = 32,
                 knowledge_dim: int | None = None, hidden: Sequence[int] = (200, 80)):
        super().__init__()
        self.inputs = CTRInputs(n_items, feature_sizes, embed_dim, knowledge_dim)
        n_fields = 2 + self.inputs.n_features
        self.first_order = nn.Linear(n_fields * embed_dim + self.inputs.knowledge_dim, 1)
        self.mlp = mlp(n_fields * embed_dim + self.inputs.knowledge_dim, hidden)
        self.out = nn.Linear(hidden[-1], 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click logits [B]."""
        candidate, history, mask, features = self.inputs.embed(batch)
        fields = torch.cat([candidate.unsqueeze(1), mean_history(history, mask).unsqueeze(1), features], dim=1)
        pairwise = 0.5 * (fields.sum(dim=1).pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1)  # FM: sum_{i<j} <v_i, v_j>
        flat = fields.flatten(1)
        knowledge = self.inputs.knowledge(batch)
        if knowledge is not None:
            flat = torch.cat([flat, knowledge], dim=1)
        return self.first_order(flat).squeeze(-1) + pairwise + self.out(self.mlp(flat)).squeeze(-1)
