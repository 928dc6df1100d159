"""NeuMF (He et al., WWW 2017, "Neural Collaborative Filtering"): a GMF branch (element-wise product of user and item
embeddings) and an MLP branch (a ReLU tower over the concatenated user and item embeddings of its own), fused by one
linear output layer over [gmf_vector, mlp_vector]. Trained with binary cross-entropy on each training interaction
(label 1) and `negatives` sampled items (label 0; uniform among the items the user has no training interaction
with, redrawn every epoch, seeded).

Pre-training (the paper's option, `pretrain: true`): GMF alone and MLP alone are trained first (`pretrain_epochs`
each, with the same early stopping), then NeuMF starts from their embeddings and tower, and its output layer is
`[alpha * h_gmf, (1 - alpha) * h_mlp]` with bias `alpha * b_gmf + (1 - alpha) * b_mlp`. Unlike the paper (vanilla
SGD after pre-training), every phase uses Adam.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from recalign.data.dataset import Dataset, UserSequences
from recalign.teachers.base import Recommender, TeacherConfig
from recalign.teachers.bprmf import NegativeSampler
from recalign.teachers.training import EpochMonitor
from recalign.threads import uses_config_threads
from recalign.training import epoch_progress

SCORE_CHUNK_ELEMENTS = 1 << 24  # users per scoring chunk: [users, n_items, first hidden width] stays under this


class NeuMFConfig(TeacherConfig):
    """Hyper-parameters of NeuMF."""

    gmf_dim: int = Field(8, ge=1, description="GMF embedding size (the paper's predictive factors; its code's "
                         "default 8)")
    mlp_layers: list[int] = Field([64, 32, 16, 8], description="MLP tower as in the paper's code: the first entry "
                                  "is the concatenated user+item embedding (each half of it), the rest are the "
                                  "widths of the ReLU layers; the last is the MLP vector's size")
    negatives: int = Field(4, ge=1, description="sampled negatives (label 0) per training interaction (paper: 4)")
    exclude_positives: bool = Field(True, description="draw negatives only among items the user has no training "
                                                      "interaction with (uniform otherwise)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (paper: 1e-3)")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay on all parameters")
    batch_size: int = Field(1024, ge=1, description="training interactions per step, each with its negatives "
                            "(paper: 256 instances; larger is faster on CPU)")
    epochs: int = Field(100, ge=1, description="maximum number of passes over the training interactions")
    init_std: float = Field(0.01, gt=0, description="std of the normal initialisation of the embeddings (paper's "
                            "code: 0.01)")
    pretrain: bool = Field(False, description="train GMF alone and MLP alone first and start NeuMF from them")
    pretrain_epochs: int = Field(20, ge=1, description="maximum epochs of each pre-training phase")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of GMF's output layer in NeuMF's after pre-training "
                         "(MLP's gets 1 - alpha; paper: 0.5)")
    eval_every: int = Field(1, ge=1, description="epochs between early-stopping checks on the valid part")
    patience: int = Field(10, ge=1, description="checks without a better valid recall@10 before stopping")
    valid_users: int | None = Field(10000, ge=1, description="users sampled for the valid check (None: all)")
    max_train_seconds: float | None = Field(None, gt=0, description="stop after the epoch that crosses this "
                                            "wall-clock budget, counted from the start of fit over all phases "
                                            "(None: no limit)")

    @field_validator("mlp_layers")
    @classmethod
    def _tower_shape(cls, value: list[int]) -> list[int]:
        if not value or any(width < 1 for width in value) or value[0] % 2:
            raise ValueError("needs at least one positive width, the first even (user half + item half)")
        return value


class NeuMFNetwork(torch.nn.Module):
    """GMF and/or MLP branches (`parts`) and the output layer over their concatenated vectors (logits)."""

    def __init__(self, n_users: int, n_items: int, gmf_dim: int, mlp_layers: list[int],
                 parts: tuple[str, ...] = ("gmf", "mlp"), init_std: float = 0.01):
        super().__init__()
        self.parts = parts
        self.gmf_dim = gmf_dim if "gmf" in parts else 0
        self.half = mlp_layers[0] // 2
        if "gmf" in parts:
            self.user_gmf = torch.nn.Parameter(torch.randn(n_users, gmf_dim) * init_std)
            self.item_gmf = torch.nn.Parameter(torch.randn(n_items, gmf_dim) * init_std)
        width = self.gmf_dim
        if "mlp" in parts:
            self.user_mlp = torch.nn.Parameter(torch.randn(n_users, self.half) * init_std)
            self.item_mlp = torch.nn.Parameter(torch.randn(n_items, self.half) * init_std)
            self.tower = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in itertools.pairwise(mlp_layers))
            width += mlp_layers[-1]
        self.output = torch.nn.Linear(width, 1)

    def zero_users(self, unseen: torch.Tensor) -> None:
        """Give the users flagged in `unseen` (BoolTensor [n_users]) all-zero user embeddings."""
        with torch.no_grad():
            for name in ("user_gmf", "user_mlp"):
                if hasattr(self, name):
                    getattr(self, name)[unseen] = 0.0

    def vectors(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[len(users), width]: [gmf_vector, mlp_vector] of each (user, item) pair."""
        # F.embedding: a deterministic backward whatever the thread count (see bprmf.py)
        out = []
        if "gmf" in self.parts:
            out.append(F.embedding(users, self.user_gmf) * F.embedding(items, self.item_gmf))
        if "mlp" in self.parts:
            hidden = torch.cat([F.embedding(users, self.user_mlp), F.embedding(items, self.item_mlp)], -1)
            for layer in self.tower:
                hidden = torch.relu(layer(hidden))
            out.append(hidden)
        return torch.cat(out, -1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits [len(users)] of the pairs (users[r], items[r])."""
        return self.output(self.vectors(users, items)).squeeze(-1)

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Logits [len(users), n_items] of every item. GMF's part is one matrix product (h·(p⊙q) = (p⊙h)·q) and
        the first MLP layer is split into a user and an item part, so only the later layers run per pair."""
        weight, bias = self.output.weight[0], self.output.bias[0]
        out = torch.zeros(len(users), self._n_items()) + bias
        if "gmf" in self.parts:
            out = out + (self.user_gmf[users] * weight[:self.gmf_dim]) @ self.item_gmf.T
        if "mlp" in self.parts:
            out = out + self._mlp_scores(users, weight[self.gmf_dim:])
        return out

    def _n_items(self) -> int:
        return len(self.item_gmf if "gmf" in self.parts else self.item_mlp)

    def _mlp_scores(self, users: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h · mlp_vector(u, i) for all items, [len(users), n_items], chunked over users."""
        pu, qi = self.user_mlp[users], self.item_mlp
        if len(self.tower) == 0:  # the MLP vector is [p_u, q_i] itself
            return (pu @ h[:self.half]).unsqueeze(1) + (qi @ h[self.half:]).unsqueeze(0)
        first = self.tower[0]
        user_part = pu @ first.weight[:, :self.half].T + first.bias  # [B, w1]
        item_part = qi @ first.weight[:, self.half:].T  # [N, w1]
        step = max(1, SCORE_CHUNK_ELEMENTS // max(1, len(qi) * first.out_features))
        chunks = []
        for start in range(0, len(users), step):
            hidden = torch.relu(user_part[start:start + step].unsqueeze(1) + item_part.unsqueeze(0))
            for layer in self.tower[1:]:
                hidden = torch.relu(layer(hidden))
            chunks.append(hidden @ h)
        return torch.cat(chunks) if chunks else torch.zeros(0, len(qi))

    def load_pretrained(self, gmf: NeuMFNetwork, mlp: NeuMFNetwork, alpha: float) -> None:
        """Start from a trained GMF and a trained MLP: their embeddings and tower, output [α h_gmf, (1-α) h_mlp]."""
        with torch.no_grad():
            for name in ("user_gmf", "item_gmf"):
                getattr(self, name).copy_(getattr(gmf, name))
            for name in ("user_mlp", "item_mlp"):
                getattr(self, name).copy_(getattr(mlp, name))
            self.tower.load_state_dict(mlp.tower.state_dict())
            self.output.weight.copy_(torch.cat([alpha * gmf.output.weight, (1 - alpha) * mlp.output.weight], 1))
            self.output.bias.copy_(alpha * gmf.output.bias + (1 - alpha) * mlp.output.bias)


class NeuMF(Recommender):
    """Neural matrix factorisation; scores by user id (`network_`: the fitted `NeuMFNetwork`).

    Users without training interactions keep all-zero user embeddings (no popularity fallback): their scores come
    from the item side alone.
    """

    name = "neumf"
    user_based = True
    Config = NeuMFConfig

    @uses_config_threads
    def fit(self, dataset: Dataset, train: pd.DataFrame, valid: pd.DataFrame | None = None,
            progress: bool = True, valid_history: pd.DataFrame | None = None) -> NeuMF:
        """Adam on the BCE loss (after the optional pre-training); with `valid`, each phase keeps the epoch with the
        best recall@10 (history = `valid_history` or `train`) and stops after `patience` checks without
        improvement. Per-epoch rows of the NeuMF phase land in `curve_`, pre-training losses in
        `pretrain_history_`."""
        cfg = self.config
        self._remember_catalog(dataset)
        started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        users = torch.from_numpy(train["user_id"].to_numpy(dtype=np.int64, copy=True))
        items = torch.from_numpy(train["item_id"].to_numpy(dtype=np.int64, copy=True))
        sampler = NegativeSampler(users, items, dataset.n_items, exclude=cfg.exclude_positives)
        unseen = torch.bincount(users, minlength=dataset.n_users) == 0
        pairs = (users, items, sampler, generator)
        phase = {"dataset": dataset, "train": train, "valid": valid, "valid_history": valid_history,
                 "progress": progress, "started": started}

        pretrained: dict[str, NeuMFNetwork] = {}
        self.pretrain_history_: dict[str, list[float]] = {}
        if cfg.pretrain:
            for part in ("gmf", "mlp"):
                pretrained[part] = self._network((part,), unseen)
                monitor = self._train_phase(pretrained[part], pairs, cfg.pretrain_epochs,
                                            f"NeuMF pre-train {part.upper()}", **phase)
                self.pretrain_history_[part] = monitor.losses
        network = self._network(("gmf", "mlp"), unseen)
        if pretrained:
            network.load_pretrained(pretrained["gmf"], pretrained["mlp"], cfg.alpha)
        monitor = self._train_phase(network, pairs, cfg.epochs, "NeuMF", **phase)
        self.network_ = network
        self._finish_fit(monitor)
        return self

    def _network(self, parts: tuple[str, ...], unseen: torch.Tensor | None = None) -> NeuMFNetwork:
        cfg = self.config
        network = NeuMFNetwork(self.n_users_, self.n_items_, cfg.gmf_dim, cfg.mlp_layers, parts, cfg.init_std)
        if unseen is not None:
            network.zero_users(unseen)
        return network

    def _train_phase(self, network: NeuMFNetwork, pairs: tuple, epochs: int, description: str, *, dataset: Dataset,
                     train: pd.DataFrame, valid: pd.DataFrame | None, valid_history: pd.DataFrame | None,
                     progress: bool, started: float) -> EpochMonitor:
        """Train `network` for up to `epochs` with early stopping; it ends holding its best validated state."""
        optimizer = torch.optim.Adam(network.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        monitor = EpochMonitor(dataset, train, valid, valid_history, self.config)
        monitor.started = started  # max_train_seconds counts every phase of the fit
        with epoch_progress(epochs, description, progress) as advance:
            for epoch in range(epochs):
                loss = self._epoch(network, optimizer, *pairs)

                def score_now(users: np.ndarray) -> torch.Tensor:
                    self.network_ = network
                    return self.score(users, monitor.history)

                if monitor.end_epoch(epoch, loss, score_now, network.state_dict, advance):
                    break
        if monitor.best_state is not None:
            network.load_state_dict(monitor.best_state)
        return monitor

    def _epoch(self, network: NeuMFNetwork, optimizer: torch.optim.Optimizer, users: torch.Tensor,
               items: torch.Tensor, sampler: NegativeSampler, generator: torch.Generator) -> float:
        """One shuffled pass over the training interactions; the mean BCE per (positive or negative) row."""
        cfg = self.config
        n_pairs = len(users)
        order = torch.randperm(n_pairs, generator=generator)
        negatives = sampler.sample(users[order], cfg.negatives, generator)  # the whole epoch's in one draw
        total = 0.0
        for start in range(0, n_pairs, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            u, i, j = users[idx], items[idx], negatives[start:start + cfg.batch_size]
            rows_u = torch.cat([u, u.repeat_interleave(cfg.negatives)])
            rows_i = torch.cat([i, j.reshape(-1)])
            labels = torch.cat([torch.ones(len(u)), torch.zeros(j.numel())])
            loss = F.binary_cross_entropy_with_logits(network(rows_u, rows_i), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
        return total / max(1, n_pairs * (1 + cfg.negatives))

    @uses_config_threads
    def score(self, users: np.ndarray | torch.Tensor, history: UserSequences) -> torch.Tensor:
        """The output layer's logit h·[gmf_vector; mlp_vector] + b of every item (before the sigmoid; history is not
        needed)."""
        self._check_fitted()
        users = torch.as_tensor(np.asarray(users), dtype=torch.long)
        with torch.no_grad():
            return self.network_.score_all(users)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.network_.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.random.fork_rng(devices=[]):  # building the network draws an initialisation: leave no trace
            self.network_ = self._network(("gmf", "mlp"))
        self.network_.load_state_dict(tensors)
