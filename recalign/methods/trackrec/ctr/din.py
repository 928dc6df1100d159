"""DIN (Zhou et al., KDD 2018): attention of the candidate over the history, then an MLP; optional knowledge vector."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from recalign.methods.trackrec.ctr.layers import CTRInputs, mlp

__all__ = ["DIN"]


class DIN(nn.Module):
    """Logit of [candidate, attention-pooled history, user features, knowledge] through an MLP (200-80)."""

    def __init__(self, n_items: int, feature_sizes: Sequence[int], embed_dim: int = 32,
                 knowledge_dim: int | None = None, hidden: Sequence[int] = (200, 80),
                 attention_hidden: Sequence[int] = (80, 40)):
        super().__init__()
        self.inputs = CTRInputs(n_items, feature_sizes, embed_dim, knowledge_dim)
        # local activation unit: scores each history item from (query, key, query - key, query * key)
        self.attention = nn.Sequential(mlp(4 * embed_dim, attention_hidden), nn.Linear(attention_hidden[-1], 1))
        width = (2 + self.inputs.n_features) * embed_dim + self.inputs.knowledge_dim
        self.mlp = mlp(width, hidden)
        self.out = nn.Linear(hidden[-1], 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click logits [B]."""
        candidate, history, mask, features = self.inputs.embed(batch)
        query = candidate.unsqueeze(1).expand_as(history)
        scores = self.attention(torch.cat([query, history, query - history, query * history], dim=-1)).squeeze(-1)
        scores = scores.masked_fill(~mask, 0.0)  # DIN keeps raw activation weights (no softmax); padding counts 0
        interest = (scores.unsqueeze(-1) * history).sum(dim=1)
        parts = [candidate, interest, features.flatten(1)]
        knowledge = self.inputs.knowledge(batch)
        if knowledge is not None:
            parts.append(knowledge)
        return self.out(self.mlp(torch.cat(parts, dim=1))).squeeze(-1)
