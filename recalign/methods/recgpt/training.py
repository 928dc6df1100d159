"""Training of the RecGPT decoder: AdamW over shuffled user sequences, right-padded, next-item code cross-entropy."""

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
    """AdamW settings (the original: lr 1e-4, no schedule), epochs, batch size, seed and progress bar."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    progress: bool = False


@dataclass
class DecoderTrainingResult:
    """Loss of every optimiser step, mean loss per epoch, and the seconds it took."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_decoder(decoder: RecGPTDecoder, sequences: Sequence[Sequence[int]], codes, text_vectors: torch.Tensor,
                  settings: DecoderTraining = DecoderTraining()) -> DecoderTrainingResult:
    """Fit `decoder` on item sequences (each sequence's last `max_items` items; sequences of < 2 items skipped)."""
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
        return _fit(decoder, usable, table, text_vectors, settings, generator)


def _fit(decoder: RecGPTDecoder, usable: list[list[int]], table: torch.Tensor, text_vectors: torch.Tensor,
         settings: DecoderTraining, generator: torch.Generator) -> DecoderTrainingResult:
    """The AdamW loop of `train_decoder` over already checked sequences."""
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    n_batches = -(-len(usable) // settings.batch_size)
    result = DecoderTrainingResult()
    started = time.perf_counter()
    decoder.train()
    with epoch_progress(settings.epochs * n_batches, "decoder", settings.progress, unit="step") as advance:
        for epoch in range(settings.epochs):
            order = torch.randperm(len(usable), generator=generator).tolist()
            total = 0.0
            for start in range(0, len(order), settings.batch_size):
                batch = [usable[i] for i in order[start:start + settings.batch_size]]
                histories = pad_histories(batch, decoder.config.max_items, side="right")
                loss = decoder.loss(histories, table, text_vectors)
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

