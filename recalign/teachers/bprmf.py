"""BPR-MF (Rendle et al., UAI 2009): user and item embeddings trained on (user, positive, uniform negative) triples."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field

from recalign.data.dataset import Dataset, UserSequences
from recalign.teachers.base import Recommender, TeacherConfig
from recalign.teachers.training import EarlyStopping, ValidationRecall, epoch_progress


class BPRMFConfig(TeacherConfig):
    """Hyper-parameters of BPR-MF."""

    dim: int = Field(64, ge=1, description="embedding size of users and items")
    lr: float = Field(5e-3, gt=0, description="Adam learning rate")
    l2: float = Field(1e-5, ge=0, description="L2 penalty on the embeddings of each batch (per example)")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay on all embeddings")
    batch_size: int = Field(4096, ge=1, description="(user, positive, negative) triples per step")
    epochs: int = Field(100, ge=1, description="maximum number of passes over the training interactions")
    negatives: int = Field(1, ge=1, description="uniform negatives per positive (a sampled negative may be a "
                                               "positive of the user; at catalog scale this is rare)")
    init_std: float = Field(0.1, gt=0, description="standard deviation of the normal initialisation")
    eval_every: int = Field(1, ge=1, description="epochs between early-stopping checks on the valid part")
    patience: int = Field(5, ge=1, description="checks without a better valid recall@10 before stopping")
    valid_users: int | None = Field(10000, ge=1, description="users sampled for the valid check (None: all)")
    max_train_seconds: float | None = Field(None, gt=0, description="stop after the epoch that crosses this "
                                            "wall-clock budget (None: no limit; makes the epoch count "
                                            "machine-dependent)")


class BPRMF(Recommender):
    """Matrix factorisation with the BPR pairwise loss; exposes `user_embeddings_` / `item_embeddings_`."""

    name = "bprmf"
    Config = BPRMFConfig

    def fit(self, dataset: Dataset, train: pd.DataFrame, valid: pd.DataFrame | None = None,
            progress: bool = True, valid_history: pd.DataFrame | None = None) -> "BPRMF":
        """Adam on the BPR loss; with `valid`, keeps the epoch with the best recall@10 (history = `valid_history`
        or `train`) and stops after `patience` checks without improvement."""
        cfg = self.config
        self._remember_catalog(dataset)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        users_emb = torch.nn.Parameter(torch.randn(dataset.n_users, cfg.dim, generator=generator) * cfg.init_std)
        items_emb = torch.nn.Parameter(torch.randn(dataset.n_items, cfg.dim, generator=generator) * cfg.init_std)
        optimizer = torch.optim.Adam([users_emb, items_emb], lr=cfg.lr, weight_decay=cfg.weight_decay)
        pair_users = torch.from_numpy(train["user_id"].to_numpy(dtype=np.int64, copy=True))
        pair_items = torch.from_numpy(train["item_id"].to_numpy(dtype=np.int64, copy=True))
        n_pairs = len(pair_users)

        checker = stopper = None
        if valid is not None and len(valid):
            history = dataset.sequences(valid_history if valid_history is not None else train)
            checker = ValidationRecall(valid, history, k=10, max_users=cfg.valid_users, seed=cfg.seed)
            stopper = EarlyStopping(cfg.patience)
        self.loss_history_: list[float] = []
        self.valid_history_: list[tuple[int, float]] = []
        started = time.perf_counter()
        with epoch_progress(cfg.epochs, "BPR-MF", progress) as advance:
            for epoch in range(cfg.epochs):
                order = torch.randperm(n_pairs, generator=generator)
                total = 0.0
                for start in range(0, n_pairs, cfg.batch_size):
                    idx = order[start:start + cfg.batch_size]
                    u, i = pair_users[idx], pair_items[idx]
                    j = torch.randint(dataset.n_items, (len(idx), cfg.negatives), generator=generator)
                    eu, ei, ej = users_emb[u], items_emb[i], items_emb[j]
                    pos = (eu * ei).sum(-1, keepdim=True)
                    neg = torch.einsum("bd,bnd->bn", eu, ej)
                    loss = -F.logsigmoid(pos - neg).mean()
                    if cfg.l2 > 0:
                        penalty = eu.pow(2).sum() + ei.pow(2).sum() + ej.pow(2).sum() / cfg.negatives
                        loss = loss + cfg.l2 * penalty / len(idx)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(idx)
                self.loss_history_.append(total / max(1, n_pairs))
                fields = {"loss": self.loss_history_[-1]}
                stop = False
                if checker is not None and (epoch + 1) % cfg.eval_every == 0:
                    self.user_embeddings_, self.item_embeddings_ = users_emb.detach(), items_emb.detach()
                    recall = checker(lambda b: self.score(b, history))
                    self.valid_history_.append((epoch + 1, recall))
                    fields["valid_recall@10"] = recall
                    stop = stopper.update(recall, epoch + 1, {"u": users_emb.detach(), "i": items_emb.detach()})
                advance(**fields)
                out_of_time = cfg.max_train_seconds is not None and time.perf_counter() - started > cfg.max_train_seconds
                if stop or out_of_time:
                    break
        if stopper is not None and stopper.best_state is not None:
            self.user_embeddings_, self.item_embeddings_ = stopper.best_state["u"], stopper.best_state["i"]
            self.best_epoch_ = stopper.best_epoch
        else:
            self.user_embeddings_, self.item_embeddings_ = users_emb.detach().clone(), items_emb.detach().clone()
            self.best_epoch_ = len(self.loss_history_)
        self.epochs_trained_ = len(self.loss_history_)
        return self

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
