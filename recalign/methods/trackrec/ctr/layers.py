"""Inputs shared by the CTR backbones: item/history/user-feature embeddings and the optional HEA knowledge vector."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from recalign.methods.trackrec.ctr.hea import HEA

__all__ = ["CTRInputs", "mlp"]


def mlp(input_dim: int, dims: Sequence[int]) -> nn.Sequential:
    """Linear + ReLU layers of the given widths (the backbone's final MLP, 200-80 by default)."""
    layers: list[nn.Module] = []
    for width in dims:
        layers += [nn.Linear(input_dim, width), nn.ReLU()]
        input_dim = width
    return nn.Sequential(*layers)


class CTRInputs(nn.Module):
    """Embeds a batch: candidate item [B, D], history [B, H, D] with mask [B, H], user features [B, F, D].

    Item id i is embedded at row i + 1; row 0 is the padding (-1) and stays zero. With `knowledge_dim`, an HEA adaptor
    turns batch["knowledge"] [B, 2, knowledge_dim] (prompt and CoT vectors) into the vector appended to the input.
    """

    def __init__(self, n_items: int, feature_sizes: Sequence[int], embed_dim: int = 32,
                 knowledge_dim: int | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.item = nn.Embedding(n_items + 1, embed_dim, padding_idx=0)
        self.features = nn.ModuleList(nn.Embedding(size, embed_dim) for size in feature_sizes)
        for table in [self.item, *self.features]:
            nn.init.xavier_uniform_(table.weight)
        with torch.no_grad():
            self.item.weight[0].zero_()
        self.hea = HEA(knowledge_dim) if knowledge_dim else None

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def knowledge_dim(self) -> int:
        """Width of the appended knowledge vector (0 without an adaptor)."""
        return self.hea.output_dim if self.hea is not None else 0

    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(candidate [B, D], history [B, H, D], mask [B, H] bool, features [B, F, D])."""
        candidate = self.item(batch["item"] + 1)
        history = self.item(batch["history"] + 1)
        mask = batch["history"] >= 0
        codes = batch["features"]
        if self.features:
            features = torch.stack([table(codes[:, j]) for j, table in enumerate(self.features)], dim=1)
        else:
            features = candidate.new_zeros(len(candidate), 0, self.embed_dim)
        return candidate, history, mask, features

    def knowledge(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The HEA knowledge vector [B, 64], or None for a backbone without knowledge."""
        if self.hea is None:
            return None
        if "knowledge" not in batch:
            raise ValueError("this model was built with a knowledge adaptor: the batch needs 'knowledge'")
        return self.hea(batch["knowledge"])


def mean_history(history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the unpadded history embeddings [B, D] (zeros for an empty history)."""
    weights = mask.float()
    return (history * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
