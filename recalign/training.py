"""What every epoch-based trainer shares: one progress bar (`epoch_progress`) and one early-stopping rule
(`EarlyStopping`: keep the best state, stop after `patience` checks without improvement)."""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger("recalign.training")


@contextmanager
def epoch_progress(total: int, description: str, enabled: bool, unit: str = "epoch",
                   transient: bool = False) -> Iterator[Callable[..., None]]:
    """The one progress bar of recalign's trainers: yields `advance(**fields)`, which steps it and shows the fields.

    Each step is also logged at INFO level on the "recalign.training" logger as `<description> <unit> i/total`
    (for runs without a terminal). `transient` bars vanish when done.
    """
    done = [0]

    def log(**fields) -> str:
        done[0] += 1
        info = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        logger.info("%s %s %d/%d %s", description, unit, done[0], total, info)
        return info

    if not enabled:
        yield log
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=transient) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(**fields) -> None:
            bar.update(task, advance=1, info=log(**fields))

        yield advance


class EarlyStopping:
    """Keeps the best state seen so far (higher metric is better) and says when `patience` checks brought nothing."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = -float("inf")
        self.best_epoch = -1
        self.best_state: dict | None = None
        self.bad_checks = 0

    def update(self, metric: float, epoch: int, state: dict) -> bool:
        """Record a check; returns True when training should stop."""
        if metric > self.best:
            self.best, self.best_epoch, self.bad_checks = metric, epoch, 0
            self.best_state = copy.deepcopy(state)
        else:
            self.bad_checks += 1
        return self.bad_checks >= self.patience
