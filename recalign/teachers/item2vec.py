"""Item2Vec (Barkan & Koenigstein, MLSP 2016): skip-gram with negative sampling (word2vec's SGNS) over each user's
time-ordered training sequence; a user is the mean of the embeddings of the items in their history.

Pairs: every (center, context) pair of distinct items at most `window` positions apart in one user's sequence, in
both directions, built with tensor ops (one pass per offset 1..window, never per user). Loss per pair:
`-log σ(v_c · u_o) - Σ_k log σ(-v_c · u_k)` over `negatives` items k drawn from the unigram distribution raised to
`ns_exponent` (0.75, as word2vec). `v` are the input embeddings (`item_embeddings_`, what scoring uses), `u` the
context (output) embeddings.
"""

from __future__ import annotations

from typing import Literal

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


class Item2VecConfig(TeacherConfig):
    """Hyper-parameters of Item2Vec."""

    dim: int = Field(64, ge=1, description="embedding size (input and context tables)")
    window: int = Field(5, ge=1, description="largest distance, in positions of a user's sequence, between a "
                        "center item and its context items")
    negatives: int = Field(5, ge=1, description="negative context items per (center, context) pair")
    ns_exponent: float = Field(0.75, ge=0, description="negatives are drawn with probability ∝ count ** ns_exponent "
                               "(0.75 as word2vec; 0 is uniform over the training items, 1 is the unigram)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(4096, ge=1, description="(center, context) pairs per step")
    epochs: int = Field(100, ge=1, description="maximum number of passes over all pairs")
    similarity: Literal["cosine", "dot"] = Field("cosine", description="score: `cosine` of each item's input "
                                                 "embedding with the mean of the unit-normalised embeddings of the "
                                                 "history, or `dot` with the mean of the raw embeddings")
    max_history: int | None = Field(None, ge=1, description="average only the last this many history items when "
                                    "scoring (None: the whole history)")
    eval_every: int = Field(1, ge=1, description="epochs between early-stopping checks on the valid part")
    patience: int = Field(10, ge=1, description="checks without a better valid recall@10 before stopping")
    valid_users: int | None = Field(10000, ge=1, description="users sampled for the valid check (None: all)")
    max_train_seconds: float | None = Field(None, gt=0, description="stop after the epoch that crosses this "
                                            "wall-clock budget (None: no limit)")


def skipgram_pairs(sequences: UserSequences, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centers, contexts) LongTensors: every ordered pair of distinct items at most `window` apart in a sequence.

    One vectorised pass per offset d = 1..window: position p pairs with p + d when both belong to the same user.
    """
    items = torch.from_numpy(np.ascontiguousarray(sequences.items, dtype=np.int64))
    owner = torch.repeat_interleave(torch.arange(sequences.n_users), torch.from_numpy(sequences.lengths()))
    centers, contexts = [], []
    for d in range(1, window + 1):
        if len(items) <= d:
            break
        same = (owner[:-d] == owner[d:]) & (items[:-d] != items[d:])
        left, right = items[:-d][same], items[d:][same]
        centers += [left, right]
        contexts += [right, left]
    if not centers:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(centers), torch.cat(contexts)


class UnigramSampler:
    """Items drawn with probability ∝ count ** exponent (inverse-CDF sampling with a seeded generator)."""

    def __init__(self, counts: torch.Tensor, exponent: float):
        weights = torch.where(counts > 0, counts.double().pow(exponent), torch.zeros((), dtype=torch.float64))
        self.cdf = torch.cumsum(weights, 0)
        self.n_items = len(counts)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """LongTensor of `shape` item ids."""
        if float(self.cdf[-1]) <= 0:
            return torch.randint(self.n_items, shape, generator=generator)
        u = torch.rand(shape, generator=generator, dtype=torch.float64) * self.cdf[-1]
        return torch.searchsorted(self.cdf, u, right=True).clamp(max=self.n_items - 1)


def history_means(history: UserSequences, users: np.ndarray, table: torch.Tensor,
                  max_history: int | None = None) -> torch.Tensor:
    """[len(users), dim]: mean of `table`'s rows over each user's (last `max_history`) history items; 0 if empty."""
    users = np.asarray(users, dtype=np.int64)
    starts, ends = history.indptr[users], history.indptr[users + 1]
    if max_history is not None:
        starts = np.maximum(starts, ends - max_history)
    lens = ends - starts
    rows = np.repeat(np.arange(len(users)), lens)
    offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    cols = torch.from_numpy(history.items[np.repeat(starts, lens) + offsets].astype(np.int64))
    total = torch.zeros(len(users), table.shape[1], dtype=table.dtype)
    total.index_add_(0, torch.from_numpy(rows), table[cols])
    return total / torch.from_numpy(lens).clamp(min=1).to(table.dtype).unsqueeze(1)


class Item2Vec(Recommender):
    """Skip-gram item embeddings; a user's scores are the similarity of each item to their history's mean.

    Exposes `item_embeddings_` (input vectors, used to score) and `context_embeddings_` (output vectors).
    """

    name = "item2vec"
    Config = Item2VecConfig

    @uses_config_threads
    def fit(self, dataset: Dataset, train: pd.DataFrame, valid: pd.DataFrame | None = None,
            progress: bool = True, valid_history: pd.DataFrame | None = None) -> Item2Vec:
        """Adam on the SGNS loss over shuffled minibatches of pairs; with `valid`, keeps the epoch with the best
        recall@10 (history = `valid_history` or `train`) and stops after `patience` checks without improvement."""
        cfg = self.config
        self._remember_catalog(dataset)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        bound = 0.5 / cfg.dim  # word2vec: input uniform(-0.5/dim, 0.5/dim), context zeros
        inputs = torch.nn.Parameter((torch.rand(dataset.n_items, cfg.dim, generator=generator) * 2 - 1) * bound)
        contexts = torch.nn.Parameter(torch.zeros(dataset.n_items, cfg.dim))
        optimizer = torch.optim.Adam([inputs, contexts], lr=cfg.lr)
        sequences = dataset.sequences(train)
        centers, targets = skipgram_pairs(sequences, cfg.window)
        counts = torch.bincount(torch.from_numpy(sequences.items.astype(np.int64)), minlength=dataset.n_items)
        sampler = UnigramSampler(counts, cfg.ns_exponent)

        monitor = EpochMonitor(dataset, train, valid, valid_history, cfg)
        with epoch_progress(cfg.epochs, "Item2Vec", progress) as advance:
            for epoch in range(cfg.epochs):
                loss = self._epoch(centers, targets, inputs, contexts, optimizer, sampler, generator)

                def score_now(users: np.ndarray) -> torch.Tensor:
                    self.item_embeddings_ = inputs.detach()
                    return self.score(users, monitor.history)

                if monitor.end_epoch(epoch, loss, score_now,
                                     lambda: {"i": inputs.detach(), "c": contexts.detach()}, advance):
                    break
        best = monitor.best_state
        if best is not None:
            self.item_embeddings_, self.context_embeddings_ = best["i"], best["c"]
        else:
            self.item_embeddings_ = inputs.detach().clone()
            self.context_embeddings_ = contexts.detach().clone()
        self._finish_fit(monitor)
        return self

    def _epoch(self, centers: torch.Tensor, targets: torch.Tensor, inputs: torch.nn.Parameter,
               contexts: torch.nn.Parameter, optimizer: torch.optim.Optimizer, sampler: UnigramSampler,
               generator: torch.Generator) -> float:
        """One shuffled pass over the pairs; the mean SGNS loss per pair."""
        cfg = self.config
        n_pairs = len(centers)
        order = torch.randperm(n_pairs, generator=generator)
        total = 0.0
        for start in range(0, n_pairs, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            negatives = sampler.sample((len(idx), cfg.negatives), generator)
            # F.embedding: a deterministic backward whatever the thread count (see bprmf.py)
            center = F.embedding(centers[idx], inputs)
            positive = (center * F.embedding(targets[idx], contexts)).sum(-1)
            negative = (center.unsqueeze(1) * F.embedding(negatives, contexts)).sum(-1)
            loss = -(F.logsigmoid(positive) + F.logsigmoid(-negative).sum(-1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        return total / max(1, n_pairs)

    @uses_config_threads
    def score(self, users: np.ndarray | torch.Tensor, history: UserSequences) -> torch.Tensor:
        """Cosine (or dot, `similarity`) of each item's embedding with the mean embedding of the user's history;
        a user without history scores 0 everywhere."""
        self._check_fitted()
        users = np.asarray(users.numpy() if isinstance(users, torch.Tensor) else users, dtype=np.int64)
        table = self.item_embeddings_
        if self.config.similarity == "cosine":
            table = F.normalize(table, dim=1)
            return F.normalize(history_means(history, users, table, self.config.max_history), dim=1) @ table.T
        return history_means(history, users, table, self.config.max_history) @ table.T

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"item_embeddings": self.item_embeddings_, "context_embeddings": self.context_embeddings_}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.item_embeddings_ = tensors["item_embeddings"]
        self.context_embeddings_ = tensors["context_embeddings"]
