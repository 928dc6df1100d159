"""Training of the RecGPT decoder: AdamW over shuffled user sequences, right-padded, next-item code cross-entropy.

Two opt-in speed-ups (the in-domain protocol turns them on; the zero-shot defaults leave them off so its numbers do
not move): `length_grouped` batches (sequences sorted by length after a seeded shuffle, cut into batches, the batch
order shuffled: little padding) and `sparse_logits` (`RecGPTDecoder.sparse_loss`: logits only for real slots, one
head per code position sized to its values). An `optimizer` passed in is used (and kept) across calls, so a caller
that trains epoch by epoch keeps one AdamW for the whole schedule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from recalign.errors import ConfigError, DataError
from recalign.methods.recgpt.decoder import RecGPTDecoder, code_table, pad_histories
from recalign.training import epoch_progress

logger = logging.getLogger("recalign.methods.recgpt")


@dataclass(frozen=True)
class DecoderTraining:
    """AdamW settings (the original: lr 1e-4, no schedule), epochs, batch size, seed, progress bar, speed-ups."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    progress: bool = False
    length_grouped: bool = False
    sparse_logits: bool = False


@dataclass
class DecoderTrainingResult:
    """Loss of every optimiser step, mean loss per epoch, and the seconds it took."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_decoder(decoder: RecGPTDecoder, sequences: Sequence[Sequence[int]], codes, text_vectors: torch.Tensor,
                  settings: DecoderTraining = DecoderTraining(), optimizer: torch.optim.Optimizer | None = None
                  ) -> DecoderTrainingResult:
    """Fit `decoder` on item sequences (each sequence's last `max_items` items; sequences of < 2 items skipped);
    `optimizer` (default: a new AdamW of `settings`) is stepped in place."""
    if settings.epochs < 0 or settings.batch_size < 1 or settings.lr <= 0:
        raise ConfigError(f"decoder training: epochs >= 0, batch_size >= 1 and lr > 0 expected, got {settings}")
    table = code_table(codes)
    usable = [list(s) for s in sequences if len(s) >= 2]
    if not usable:
        raise DataError("decoder training: no sequence has two or more items")
    flat = [i for s in usable for i in s]
    if min(flat) < 0 or max(flat) >= table.shape[0]:
        raise DataError(f"decoder training: item ids must lie in [0, {table.shape[0]}), got {min(flat)}..{max(flat)}")
    generator = torch.Generator().manual_seed(settings.seed)
    device = next(decoder.parameters()).device
    table, text_vectors = table.to(device), text_vectors.to(device)  # moved once, not per batch
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)  # dropout draws; the caller's random state is left as it was
        return _fit(decoder, usable, table, text_vectors, settings, generator, optimizer)


def _fit(decoder: RecGPTDecoder, usable: list[list[int]], table: torch.Tensor, text_vectors: torch.Tensor,
         settings: DecoderTraining, generator: torch.Generator, optimizer: torch.optim.Optimizer | None = None
         ) -> DecoderTrainingResult:
    """The AdamW loop of `train_decoder` over already checked sequences."""
    if optimizer is None:
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = decoder.sparse_loss if settings.sparse_logits else decoder.loss
    lengths = [min(len(s), decoder.config.max_items) for s in usable]
    n_batches = -(-len(usable) // settings.batch_size)
    result = DecoderTrainingResult()
    started = time.perf_counter()
    decoder.train()
    with epoch_progress(settings.epochs * n_batches, "decoder", settings.progress, unit="step") as advance:
        for epoch in range(settings.epochs):
            total = 0.0
            for rows in batch_order(lengths, settings.batch_size, generator, settings.length_grouped):
                histories = pad_histories([usable[i] for i in rows], decoder.config.max_items, side="right")
                loss = loss_fn(histories, table, text_vectors)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                result.step_losses.append(value)
                total += value
                advance(epoch=epoch + 1, loss=value)
            result.epoch_losses.append(total / n_batches)
            logger.info("decoder epoch %d/%d loss %.4f", epoch + 1, settings.epochs, result.epoch_losses[-1])
    decoder.eval()
    result.seconds = time.perf_counter() - started
    return result


def batch_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator, grouped: bool = False
                ) -> list[list[int]]:
    """One epoch's batches of row indices: a seeded shuffle cut into batches, or (`grouped`) the shuffle stably
    sorted by length, cut into batches of similar length, and the batches' order shuffled (same generator)."""
    order = torch.randperm(len(lengths), generator=generator)
    if grouped:
        order = order[torch.argsort(torch.as_tensor(lengths)[order], stable=True)]
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if grouped:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches
