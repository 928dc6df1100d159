"""Training plumbing of the learned teachers: a cheap validation recall and the per-epoch monitor (the progress bar
and early stopping are `recalign.training`'s)."""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import pandas as pd
import torch

from recalign.data.dataset import UserSequences
from recalign.training import EarlyStopping

logger = logging.getLogger("recalign.teachers")


class ValidationRecall:
    """Recall@k of a score function on held-out interactions, history excluded, over a fixed user sample.

    Built once per fit (the relevant sets and the user sample do not change between epochs), so each check is a
    chunked full ranking: cheap enough to run every few epochs.
    """

    def __init__(self, valid: pd.DataFrame, history: UserSequences, k: int = 10, max_users: int | None = 10000,
                 seed: int = 0):
        users = np.unique(valid["user_id"].to_numpy())
        if max_users is not None and len(users) > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
        self.users = users
        self.history = history
        self.k = k
        keep = valid["user_id"].isin(users).to_numpy()
        rows = np.searchsorted(users, valid["user_id"].to_numpy()[keep])
        self.rows = torch.from_numpy(rows.astype(np.int64))
        self.cols = torch.from_numpy(valid["item_id"].to_numpy()[keep].astype(np.int64))
        # relevant items of a user that are already in the history can never be hit; recall counts them anyway
        self.n_relevant = torch.bincount(self.rows, minlength=len(users)).clamp(min=1).float()

    def __call__(self, score: Callable[[np.ndarray], torch.Tensor], chunk: int = 1024) -> float:
        """Mean recall@k over the sampled users."""
        if len(self.users) == 0:
            return 0.0
        hits = torch.zeros(len(self.users))
        for start in range(0, len(self.users), chunk):
            batch = self.users[start:start + chunk]
            scores = score(batch).float().clone()
            rows, cols = self.history.mask_coordinates(batch)
            scores[rows, cols] = -torch.inf
            top = torch.topk(scores, self.k, dim=1).indices  # a full stable sort is too slow for a per-epoch check
            in_chunk = (self.rows >= start) & (self.rows < start + len(batch))
            relevant = torch.zeros_like(scores, dtype=torch.bool)
            relevant[self.rows[in_chunk] - start, self.cols[in_chunk]] = True
            hits[start:start + len(batch)] = relevant.gather(1, top).sum(1).float()
        return float((hits / self.n_relevant).mean())


class EpochMonitor:
    """Per-epoch bookkeeping of a learned teacher: loss and validation history, early stop, curve rows, time budget.

    `end_epoch` records one epoch and says whether to stop; after the loop, `best_state` / `best_epoch` hold the
    state of the best validation check (None / the last epoch when there was no validation part).
    """

    def __init__(self, dataset, train: pd.DataFrame, valid: pd.DataFrame | None,
                 valid_history: pd.DataFrame | None, config, min_epochs: int = 0) -> None:
        from recalign.eval.curves import CurveLog

        self.config = config
        self.min_epochs = min_epochs  # early stopping cannot stop before this many epochs (the best state is kept)
        self.checker: ValidationRecall | None = None
        self.stopper: EarlyStopping | None = None
        self.history: UserSequences | None = None
        if valid is not None and len(valid):
            self.history = dataset.sequences(valid_history if valid_history is not None else train)
            self.checker = ValidationRecall(valid, self.history, k=10, max_users=config.valid_users, seed=config.seed)
            self.stopper = EarlyStopping(config.patience)
        self.losses: list[float] = []
        self.valid: list[tuple[int, float]] = []
        self.curve = CurveLog("recall@10")
        self.started = time.perf_counter()

    def end_epoch(self, epoch: int, loss: float, score: Callable[[np.ndarray], torch.Tensor],
                  state: Callable[[], dict], advance: Callable[..., None]) -> bool:
        """Record epoch `epoch` (0-based): validate every `eval_every` epochs; True when training should stop."""
        self.losses.append(loss)
        fields: dict = {"loss": loss}
        stop, recall = False, None
        if self.checker is not None and (epoch + 1) % self.config.eval_every == 0:
            recall = self.checker(score)
            self.valid.append((epoch + 1, recall))
            fields["valid_recall@10"] = recall
            stop = self.stopper.update(recall, epoch + 1, state()) and epoch + 1 >= self.min_epochs
        self.curve.add(epoch + 1, loss, recall)
        advance(**fields)
        budget = self.config.max_train_seconds
        return stop or (budget is not None and time.perf_counter() - self.started > budget)

    @property
    def best_state(self) -> dict | None:
        """The state saved at the best validation check (None without validation)."""
        return None if self.stopper is None else self.stopper.best_state

    @property
    def best_epoch(self) -> int:
        """The epoch of the best validation check, else the last epoch trained."""
        return self.stopper.best_epoch if self.best_state is not None else len(self.losses)
