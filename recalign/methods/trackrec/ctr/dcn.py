"""DCNv2 (Wang et al., WWW 2021): full-rank cross layers beside an MLP; optional knowledge vector in the input."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from recalign.methods.trackrec.ctr.layers import CTRInputs, mean_history, mlp

__all__ = ["DCNv2"]


class DCNv2(nn.Module):
    """x0 = [candidate, mean history, user features, knowledge]; x_{l+1} = x0 * (W_l x_l + b_l) + x_l; parallel MLP."""

    def __init__(self, n_items: int, feature_sizes: Sequence[int], embed_dim: int = 32,
                 knowledge_dim: int | None = None, hidden: Sequence[int] = (200, 80), cross_layers: int = 3):
        super().__init__()
        self.inputs = CTRInputs(n_items, feature_sizes, embed_dim, knowledge_dim)
        width = (2 + self.inputs.n_features) * embed_dim + self.inputs.knowledge_dim
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(cross_layers))
        self.mlp = mlp(width, hidden)
        self.out = nn.Linear(width + hidden[-1], 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click logits [B]."""
        candidate, history, mask, features = self.inputs.embed(batch)
        parts = [candidate, mean_history(history, mask), features.flatten(1)]
        knowledge = self.inputs.knowledge(batch)
        if knowledge is not None:
            parts.append(knowledge)
        x0 = torch.cat(parts, dim=1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.out(torch.cat([x, self.mlp(x0)], dim=1)).squeeze(-1)
