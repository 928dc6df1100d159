"""SASRec (Kang & McAuley, ICDM 2018), trained pmixer-style: one sequence per user, a loss at every position.

Unlike RecBole, which turns every prefix into its own sample and keeps only the last position (~40x the work for the
same supervision), each user's training sequence is fed once per epoch and every position predicts its next item.
Items are shifted by one inside the network so that 0 is the padding token.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recalign.data.dataset import Dataset, UserSequences
from recalign.teachers.base import Recommender, TeacherConfig
from recalign.teachers.training import EpochMonitor
from recalign.threads import uses_config_threads
from recalign.training import epoch_progress


class SASRecConfig(TeacherConfig):
    """Hyper-parameters of SASRec."""

    max_len: int = Field(50, ge=1, le=200, description="only the last max_len items of a history are used")
    dim: int = Field(64, ge=1, description="hidden size = item embedding size")
    blocks: int = Field(2, ge=1, description="self-attention blocks")
    heads: int = Field(1, ge=1, description="attention heads per block (dim must be divisible by heads)")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout on embeddings, attention and feed-forward")
    loss: Literal["bce", "ce", "sampled_softmax"] = Field(
        "sampled_softmax", description="bce: the positive vs `bce_negatives` uniform negatives per position "
        "(the original paper); ce: softmax cross-entropy over the full catalog; sampled_softmax: softmax over the "
        "positive and `negatives` uniform negatives shared by the whole batch (much cheaper than ce)")
    negatives: int = Field(256, ge=1, description="sampled_softmax: uniform negatives shared by a batch")
    bce_negatives: int = Field(1, ge=1, description="bce: uniform negatives per position")
    logq_correction: bool = Field(False, description="sampled_softmax only: add log(n_items / negatives) to the "
                                  "negatives' logits so the sampled loss estimates the full softmax")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    l2: float = Field(0.0, ge=0, description="Adam weight decay")
    batch_size: int = Field(128, ge=1, description="user sequences per step")
    epochs: int = Field(200, ge=1, description="maximum number of passes over the users")
    eval_every: int = Field(1, ge=1, description="epochs between early-stopping checks on the valid part")
    patience: int = Field(5, ge=1, description="checks without a better valid recall@10 before stopping")
    min_steps: int = Field(1000, ge=0, description="early stopping cannot stop before this many optimizer steps: "
                           "a small dataset has few steps per epoch (MovieLens-100K: 8 at batch 128), and a noisy "
                           "validation check would otherwise stop it long before the model has learned")
    valid_users: int | None = Field(10000, ge=1, description="users sampled for the valid check (None: all)")
    max_train_seconds: float | None = Field(None, gt=0, description="stop after the epoch that crosses this "
                                            "wall-clock budget (None: no limit; makes the epoch count "
                                            "machine-dependent)")
    bucket_by_length: bool = Field(True, description="group users of similar length into a batch so short "
                                   "sequences are not padded to max_len (same model, much less work)")


class SASRecNetwork(nn.Module):
    """Embedding + positional embedding, causal self-attention blocks with pre-LayerNorm queries (as in pmixer)."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.dim = cfg.dim
        self.item_emb = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(cfg.dim, eps=1e-8) for _ in range(cfg.blocks))
        self.attns = nn.ModuleList(nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
                                   for _ in range(cfg.blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(cfg.dim, eps=1e-8) for _ in range(cfg.blocks))
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.Dropout(cfg.dropout), nn.ReLU(),
                                                nn.Linear(cfg.dim, cfg.dim), nn.Dropout(cfg.dropout))
                                  for _ in range(cfg.blocks))
        self.last_norm = nn.LayerNorm(cfg.dim, eps=1e-8)
        self.heads = cfg.heads
        self.max_len = cfg.max_len
        # Xavier everywhere (as pmixer): the default N(0, 1) embeddings make the initial logits huge
        for name, param in self.named_parameters():
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: LongTensor [B, L] of shifted item ids (0 = padding), left-padded, L <= max_len -> [B, L, dim].

        Position embeddings count from the right end of a max_len window, so cutting leading padding columns
        leaves the result unchanged.
        """
        batch, length = seq.shape
        valid = seq > 0
        positions = torch.arange(self.max_len - length, self.max_len, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.dim) + self.pos_emb(positions)
        x = self.emb_dropout(x) * valid.unsqueeze(-1)
        # a query sees earlier non-padding keys and always itself (so fully padded rows give no NaN)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        allowed = (causal & valid.unsqueeze(1)) | torch.eye(length, dtype=torch.bool, device=seq.device)
        blocked = (~allowed).repeat_interleave(self.heads, dim=0)
        for attn_norm, attn, ffn_norm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns):
            query = attn_norm(x)
            out, _ = attn(query, x, x, attn_mask=blocked, need_weights=False)
            x = ffn_norm(query + out)
            x = (x + ffn(x)) * valid.unsqueeze(-1)
        return self.last_norm(x)

    def item_weights(self) -> torch.Tensor:
        """Output embeddings of the real items [n_items, dim] (shared with the input embeddings)."""
        return self.item_emb.weight[1:]


class SASRec(Recommender):
    """Self-attentive sequential recommender; `score` uses the last `max_len` items of each user's history."""

    name = "sasrec"
    Config = SASRecConfig

    @uses_config_threads
    def fit(self, dataset: Dataset, train: pd.DataFrame, valid: pd.DataFrame | None = None,
            progress: bool = True, valid_history: pd.DataFrame | None = None) -> "SASRec":
        """Adam over shuffled user sequences; with `valid`, keeps the best valid recall@10 (history =
        `valid_history` or `train`) and stops after `patience` checks without improvement. Per-epoch rows land in
        `curve_`."""
        cfg = self.config
        self._remember_catalog(dataset)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.network_ = SASRecNetwork(dataset.n_items, cfg)
        optimizer = torch.optim.Adam(self.network_.parameters(), lr=cfg.lr, betas=(0.9, 0.98), foreach=True,
                                     weight_decay=cfg.l2)
        sequences = dataset.sequences(train)
        lengths = np.minimum(sequences.lengths(), cfg.max_len + 1)
        trainable = np.flatnonzero(lengths >= 2)
        windows = sequences.padded(trainable, cfg.max_len + 1, pad=-1) + 1  # 0 = padding

        steps_per_epoch = max(1, math.ceil(len(trainable) / cfg.batch_size))
        monitor = EpochMonitor(dataset, train, valid, valid_history, cfg,
                               min_epochs=math.ceil(cfg.min_steps / steps_per_epoch))
        with epoch_progress(cfg.epochs, "SASRec", progress) as advance:
            for epoch in range(cfg.epochs):
                self.network_.train()
                total, count = 0.0, 0
                for rows in self._batches(lengths[trainable], generator):
                    window = windows[rows]
                    width = int(lengths[trainable][rows].max())
                    window = window[:, -width:]  # drop columns that are padding for every row
                    inputs, targets = window[:, :-1], window[:, 1:]
                    mask = (inputs > 0) & (targets > 0)
                    hidden = self.network_(inputs)[mask]
                    loss = self._loss(hidden, targets[mask] - 1, generator)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * int(mask.sum())
                    count += int(mask.sum())
                if monitor.end_epoch(epoch, total / max(1, count), lambda b: self.score(b, monitor.history),
                                     self.network_.state_dict, advance):
                    break
        if monitor.best_state is not None:
            self.network_.load_state_dict(monitor.best_state)
        self.network_.eval()
        self._finish_fit(monitor)
        return self

    def _batches(self, lengths: np.ndarray, generator: torch.Generator) -> list[torch.Tensor]:
        """Row indices of each batch: a random order, optionally sorted by length inside chunks of 50 batches."""
        bs = self.config.batch_size
        order = torch.randperm(len(lengths), generator=generator)
        if self.config.bucket_by_length:
            chunk = bs * 50
            parts = []
            for start in range(0, len(order), chunk):
                part = order[start:start + chunk]
                parts.append(part[torch.from_numpy(np.argsort(-lengths[part.numpy()], kind="stable"))])
            order = torch.cat(parts)
        batches = list(torch.split(order, bs))
        shuffle = torch.randperm(len(batches), generator=generator)
        return [batches[i] for i in shuffle]

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Loss of hidden states [M, dim] predicting item ids targets [M]."""
        cfg = self.config
        weights = self.network_.item_weights()
        n_items = weights.shape[0]
        if cfg.loss == "ce":
            return F.cross_entropy(hidden @ weights.T, targets)
        positive = (hidden * weights[targets]).sum(-1)
        if cfg.loss == "bce":
            negatives = torch.randint(n_items, (len(targets), cfg.bce_negatives), generator=generator)
            negative = torch.einsum("md,mnd->mn", hidden, weights[negatives])
            return (F.binary_cross_entropy_with_logits(positive, torch.ones_like(positive))
                    + F.binary_cross_entropy_with_logits(negative, torch.zeros_like(negative), reduction="none")
                    .sum(-1).mean())
        negatives = torch.randint(n_items, (cfg.negatives,), generator=generator)
        negative = hidden @ weights[negatives].T
        if cfg.logq_correction:
            negative = negative + math.log(n_items / cfg.negatives)
        negative = negative.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), -torch.inf)  # accidental hits
        logits = torch.cat([positive.unsqueeze(1), negative], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long))

    @torch.no_grad()
    @uses_config_threads
    def score(self, users: np.ndarray | torch.Tensor, history: UserSequences, chunk: int = 1024) -> torch.Tensor:
        """Next-item scores [B, n_items] from the hidden state at the last history position."""
        self._check_fitted()
        users = np.asarray(users, dtype=np.int64)
        was_training = self.network_.training
        self.network_.eval()
        weights = self.network_.item_weights()
        out = []
        lengths = history.lengths()
        for start in range(0, len(users), chunk):
            batch = users[start:start + chunk]
            width = max(1, int(np.minimum(lengths[batch], self.config.max_len).max(initial=0)))
            seq = history.padded(batch, width, pad=-1) + 1
            out.append(self.network_(seq)[:, -1] @ weights.T)
        self.network_.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.n_items_)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.network_.state_dict())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network_ = SASRecNetwork(self.n_items_, self.config)
        self.network_.load_state_dict(tensors)
        self.network_.eval()
