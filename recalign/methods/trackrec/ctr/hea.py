"""HEA adaptor (KAR): two towers (prompt vector, CoT vector), shared + tower-specific experts, softmax gate per tower."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HEA"]


class HEA(nn.Module):
    """Maps knowledge [B, T, d] (T towers: prompt, CoT) to one [B, T * out_dim] vector (64-d for 2 x 32).

    Each tower mixes `n_shared` experts shared by all towers and `n_specific` experts of its own; every expert is an
    MLP d -> hidden -> out_dim with ReLU, applied to that tower's input; the mixture weights are a softmax gate
    Linear(d -> n_shared + n_specific) of the tower's input. Experts are held as stacked weights so that all experts
    of all towers run as two batched matmuls.
    """

    def __init__(self, input_dim: int, towers: int = 2, n_shared: int = 2, n_specific: int = 5,
                 hidden: int = 128, out_dim: int = 32):
        super().__init__()
        if min(input_dim, towers, hidden, out_dim) < 1 or n_shared < 0 or n_specific < 0 or n_shared + n_specific < 1:
            raise ValueError("HEA needs positive sizes and at least one expert per tower")
        self.towers, self.out_dim = towers, out_dim
        n_total = n_shared + towers * n_specific
        self.w1 = nn.Parameter(torch.empty(n_total, input_dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(n_total, hidden))
        self.w2 = nn.Parameter(torch.empty(n_total, hidden, out_dim))
        self.b2 = nn.Parameter(torch.zeros(n_total, out_dim))
        for weight in (self.w1, self.w2):
            for e in range(n_total):
                nn.init.xavier_uniform_(weight.data[e])
        # experts of tower t: the shared ones, then its own block of n_specific
        shared = torch.arange(n_shared).expand(towers, n_shared)
        own = n_shared + torch.arange(towers)[:, None] * n_specific + torch.arange(n_specific)[None, :]
        self.register_buffer("expert_index", torch.cat([shared, own], dim=1), persistent=False)  # [T, E]
        self.gate = nn.ModuleList(nn.Linear(input_dim, n_shared + n_specific) for _ in range(towers))

    @property
    def output_dim(self) -> int:
        return self.towers * self.out_dim

    def gates(self, knowledge: torch.Tensor) -> torch.Tensor:
        """Mixture weights [B, T, E] of every tower's experts (each row sums to 1)."""
        self._check(knowledge)
        return torch.stack([gate(knowledge[:, t]) for t, gate in enumerate(self.gate)], dim=1).softmax(dim=-1)

    def experts(self, knowledge: torch.Tensor) -> torch.Tensor:
        """Expert outputs [B, T, E, out_dim] of every tower on its own input."""
        self._check(knowledge)
        idx = self.expert_index
        hidden = torch.relu(torch.einsum("btd,tedh->bteh", knowledge, self.w1[idx]) + self.b1[idx])
        return torch.einsum("bteh,teho->bteo", hidden, self.w2[idx]) + self.b2[idx]

    def forward(self, knowledge: torch.Tensor) -> torch.Tensor:
        """The knowledge vector [B, T * out_dim]: per tower, the gate-weighted sum of its experts, concatenated."""
        mixed = (self.gates(knowledge).unsqueeze(-1) * self.experts(knowledge)).sum(dim=2)  # [B, T, out]
        return mixed.flatten(1)

    def _check(self, knowledge: torch.Tensor) -> None:
        if knowledge.dim() != 3 or knowledge.shape[1] != self.towers or knowledge.shape[2] != self.w1.shape[1]:
            raise ValueError(f"HEA expects knowledge [B, {self.towers}, {self.w1.shape[1]}], "
                             f"got {list(knowledge.shape)}")
