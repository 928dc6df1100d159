"""BPR-MF (Rendle et al., UAI 2009): user and item embeddings trained on (user, positive, sampled negative) triples.

Defaults follow RecBole 1.2.1's BPR (Adam lr 1e-3, batch 2048, no L2, Xavier-normal init, negatives never among the
user's training items) with 128 factors instead of 64 (chosen on validation recall), and beat it on the same splits
(BENCHMARKS.md, "Teachers: BPR-MF vs RecBole").
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field

from recalign.data.dataset import Dataset, UserSequences
from recalign.teachers.base import Recommender, TeacherConfig
from recalign.teachers.training import EpochMonitor
from recalign.threads import uses_config_threads
from recalign.training import epoch_progress


class BPRMFConfig(TeacherConfig):
    """Hyper-parameters of BPR-MF."""

    dim: int = Field(128, ge=1, description="embedding size of users and items (128 beat RecBole's 64 on Beauty's "
                     "validation recall, BENCHMARKS.md)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    l2: float = Field(0.0, ge=0, description="L2 penalty on the embeddings of each batch (per example)")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay on all embeddings")
    batch_size: int = Field(2048, ge=1, description="(user, positive, negative) triples per step")
    epochs: int = Field(300, ge=1, description="maximum number of passes over the training interactions")
    negatives: int = Field(1, ge=1, description="sampled negatives per positive")
    exclude_positives: bool = Field(True, description="draw negatives only among items the user has no training "
                                                      "interaction with (uniform otherwise)")
    init_std: float | None = Field(None, gt=0, description="std of a normal initialisation (None: Xavier-normal, "
                                   "std = sqrt(2 / (rows + dim)) per table, as RecBole)")
    eval_every: int = Field(1, ge=1, description="epochs between early-stopping checks on the valid part")
    patience: int = Field(30, ge=1, description="checks without a better valid recall@10 before stopping (the "
                          "valid recall of a small lr climbs slowly and noisily: 10 stopped ML-100K at a third of "
                          "its best valid epoch)")
    valid_users: int | None = Field(10000, ge=1, description="users sampled for the valid check (None: all)")
    max_train_seconds: float | None = Field(None, gt=0, description="stop after the epoch that crosses this "
                                            "wall-clock budget (None: no limit; makes the epoch count "
                                            "machine-dependent)")


class NegativeSampler:
    """Uniform negative items per (user, positive) row that avoid the user's training items.

    The user's items are looked up as sorted keys user * n_items + item (torch.searchsorted); collisions are
    redrawn for a few rounds, so a negative is a positive only for users who interacted with nearly every item.
    """

    def __init__(self, users: torch.Tensor, items: torch.Tensor, n_items: int, exclude: bool = True,
                 rounds: int = 10):
        self.n_items = n_items
        self.rounds = rounds if exclude else 0
        self.keys = torch.unique(users * n_items + items) if exclude else torch.zeros(0, dtype=torch.long)

    def is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """BoolTensor: items[r, c] is a training item of users[r]."""
        keys = users.unsqueeze(1) * self.n_items + items
        at = torch.searchsorted(self.keys, keys).clamp(max=max(0, len(self.keys) - 1))
        return self.keys[at] == keys if len(self.keys) else torch.zeros_like(keys, dtype=torch.bool)

    def sample(self, users: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """LongTensor [len(users), n] of negative items."""
        drawn = torch.randint(self.n_items, (len(users), n), generator=generator)
        if self.rounds == 0:
            return drawn
        rows, cols = self.is_positive(users, drawn).nonzero(as_tuple=True)
        for _ in range(self.rounds):  # later rounds only look at the (few) clashing draws
            if len(rows) == 0:
                break
            redraw = torch.randint(self.n_items, (len(rows),), generator=generator)
            drawn[rows, cols] = redraw
            clash = self.is_positive(users[rows], redraw.unsqueeze(1)).squeeze(1)
            rows, cols = rows[clash], cols[clash]
        return drawn


def xavier_normal(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """N(0, 2 / (rows + dim)): torch's xavier_normal_ of an embedding table [rows, dim]."""
    return torch.randn(rows, dim, generator=generator) * math.sqrt(2.0 / (rows + dim))


class BPRMF(Recommender):
    """Matrix factorisation with the BPR pairwise loss; exposes `user_embeddings_` / `item_embeddings_`."""

    name = "bprmf"
    user_based = True
    Config = BPRMFConfig

    @uses_config_threads
    def fit(self, dataset: Dataset, train: pd.DataFrame, valid: pd.DataFrame | None = None,
            progress: bool = True, valid_history: pd.DataFrame | None = None) -> "BPRMF":
        """Adam on the BPR loss; with `valid`, keeps the epoch with the best recall@10 (history = `valid_history`
        or `train`) and stops after `patience` checks without improvement. Per-epoch rows land in `curve_`."""
        cfg = self.config
        self._remember_catalog(dataset)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        users_emb = torch.nn.Parameter(self._init(dataset.n_users, generator))
        items_emb = torch.nn.Parameter(self._init(dataset.n_items, generator))
        optimizer = torch.optim.Adam([users_emb, items_emb], lr=cfg.lr, weight_decay=cfg.weight_decay)
        pair_users = torch.from_numpy(train["user_id"].to_numpy(dtype=np.int64, copy=True))
        pair_items = torch.from_numpy(train["item_id"].to_numpy(dtype=np.int64, copy=True))
        sampler = NegativeSampler(pair_users, pair_items, dataset.n_items, exclude=cfg.exclude_positives)
        n_pairs = len(pair_users)

        monitor = EpochMonitor(dataset, train, valid, valid_history, cfg)
        with epoch_progress(cfg.epochs, "BPR-MF", progress) as advance:
            for epoch in range(cfg.epochs):
                order = torch.randperm(n_pairs, generator=generator)
                # the whole epoch's negatives in one vectorised draw (per batch, the lookups' overhead dominates)
                negatives = sampler.sample(pair_users[order], cfg.negatives, generator)
                total = 0.0
                for start in range(0, n_pairs, cfg.batch_size):
                    idx = order[start:start + cfg.batch_size]
                    u, i = pair_users[idx], pair_items[idx]
                    j = negatives[start:start + cfg.batch_size]
                    # F.embedding: its backward accumulates rows deterministically whatever the thread count
                    # (indexing's backward uses parallel atomic adds, which made TRD vary run to run).
                    eu, ei, ej = F.embedding(u, users_emb), F.embedding(i, items_emb), F.embedding(j, items_emb)
                    pos = (eu * ei).sum(-1, keepdim=True)
                    neg = (eu.unsqueeze(1) * ej).sum(-1)
                    loss = -F.logsigmoid(pos - neg).mean()
                    if cfg.l2 > 0:
                        penalty = eu.pow(2).sum() + ei.pow(2).sum() + ej.pow(2).sum() / cfg.negatives
                        loss = loss + cfg.l2 * penalty / len(idx)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(idx)

                def score_now(users: np.ndarray) -> torch.Tensor:
                    self.user_embeddings_, self.item_embeddings_ = users_emb.detach(), items_emb.detach()
                    return self.score(users, monitor.history)

                if monitor.end_epoch(epoch, total / max(1, n_pairs), score_now,
                                     lambda: {"u": users_emb.detach(), "i": items_emb.detach()}, advance):
                    break
        best = monitor.best_state
        if best is not None:
            self.user_embeddings_, self.item_embeddings_ = best["u"], best["i"]
        else:
            self.user_embeddings_, self.item_embeddings_ = users_emb.detach().clone(), items_emb.detach().clone()
        self._finish_fit(monitor)
        return self

    def _init(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """Initial embedding table [rows, dim]: Xavier-normal, or N(0, init_std) when set."""
        if self.config.init_std is None:
            return xavier_normal(rows, self.config.dim, generator)
        return torch.randn(rows, self.config.dim, generator=generator) * self.config.init_std

    @uses_config_threads
    def score(self, users: np.ndarray | torch.Tensor, history: UserSequences) -> torch.Tensor:
        """Dot products of the users' and all items' embeddings (history is not needed by MF)."""
        self._check_fitted()
        users = torch.as_tensor(np.asarray(users), dtype=torch.long)
        return self.user_embeddings_[users] @ self.item_embeddings_.T

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"user_embeddings": self.user_embeddings_, "item_embeddings": self.item_embeddings_}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.user_embeddings_ = tensors["user_embeddings"]
        self.item_embeddings_ = tensors["item_embeddings"]
