"""S-DPO (softmax-DPO): one chosen answer against several negatives per prompt (docs/systems/trackrec.md).

With Δ(y) = log π_θ(y|x) − log π_ref(y|x) summed over the completion tokens, one sample's loss is

    L = −log σ(−log Σ_{j∈N} exp(β·[Δ(y_j) − Δ(y_w)]))

The log-sum-exp runs over that sample's own negatives and the batch loss is the mean over samples (the original
pooled the log-sum-exp over the whole batch: docs/systems/trackrec.md, defect 4). With one negative it is the
sigmoid DPO loss.

The trainer is our own small loop on the kit (`recalign.llm.trainer`: settings, adapters, `TrainResult`) rather
than a TRL `DPOTrainer` subclass: TRL's DPO data pipeline (tokenizer, collator, concatenated forward) is built for
exactly one rejected answer, and S-DPO needs a variable list of them per prompt. π_ref is the model as it comes in
(the generator before the update, step (d) of `recalign.methods.trackrec.algorithm`): its completion log-probs are
computed once, without gradients, before the first optimizer step, so no reference copy is kept in memory and
nothing is reloaded from `config._name_or_path`. Prompts are chat-rendered strings; every completion gets the EOS
token appended.

Under `accelerate launch` (N processes) a step's global batch is N·batch_size samples of the shared seeded order,
rank r taking the r-th slice (wrapping around at the end, as accelerate's even batches do); the gradients and the
logged numbers are averaged over the processes, so N processes with batch b step like one with batch N·b.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from recalign.errors import ConfigError
from recalign.llm.dpo import DPOResult
from recalign.llm.trainer import (
    TrainerConfig,
    all_reduce_sum,
    average_gradients,
    data_parallel_state,
    make_adapter_trainable,
    use_cpu,
)

__all__ = ["SDPOConfig", "SDPOResult", "sdpo_losses", "sdpo_loss", "dpo_losses", "select_preferences",
           "sequence_logprobs", "train_sdpo"]


class SDPOConfig(TrainerConfig):
    """Hyper-parameters of one S-DPO pass (TrackRec step d: β 0.1, 2 negatives, cosine, 3% warm-up, wd 0.05)."""

    beta: float = Field(0.1, gt=0.0, description="β of the softmax-DPO loss")
    n_negatives: int = Field(2, ge=1, description="negatives per prompt, sampled from the non-chosen answers")
    learning_rate: float = Field(1e-5, gt=0.0, description="AdamW learning rate (TrackRec, full FT: 1e-6)")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="linear warm-up share of the steps")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    batch_size: int = Field(2, ge=1, description="prompts (each with its chosen and negatives) per micro-batch")
    max_length: int = Field(1024, ge=8, description="max prompt+completion tokens (longer is truncated)")


@dataclass
class SDPOResult(DPOResult):
    """An S-DPO pass's `TrainResult`; its summary adds the reward accuracy and margin of the last logged step."""

    prefix: str = "sdpo"


# ---- the loss --------------------------------------------------------------------------------------------------

def sdpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample S-DPO losses [B] from Δ of the chosen [B] and of the negatives [B, N] (`mask` [B, N]: real ones)."""
    if rejected.dim() != 2 or chosen.shape != rejected.shape[:1]:
        raise ValueError(f"sdpo: chosen must be [B] and rejected [B, N]; got {tuple(chosen.shape)}, "
                         f"{tuple(rejected.shape)}")
    logits = beta * (rejected - chosen.unsqueeze(1))
    if mask is not None:
        if not bool(mask.any(dim=1).all()):
            raise ValueError("sdpo: every sample needs at least one negative")
        logits = logits.masked_fill(~mask, float("-inf"))
    return -F.logsigmoid(-torch.logsumexp(logits, dim=1))  # log-sum-exp over this sample's negatives only


def sdpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """The batch S-DPO loss: the mean of the per-sample losses."""
    return sdpo_losses(chosen, rejected, beta, mask).mean()


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample sigmoid DPO losses −log σ(β·[Δ(y⁺) − Δ(y⁻)]), for comparison (docs/systems/trackrec.md)."""
    return -F.logsigmoid(beta * (chosen - rejected))


def select_preferences(rewards: torch.Tensor, n_negatives: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], negatives [B, k]): the best-reward answer, and k = min(n_negatives, n−1) of the rest at random."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ConfigError("S-DPO needs at least 2 answers per prompt (one chosen, one negative)")
    chosen = rewards.argmax(dim=1)
    keys = torch.rand(rewards.shape, generator=generator)
    keys[torch.arange(len(rewards)), chosen] = -1.0  # the chosen answer is never its own negative
    k = min(n_negatives, rewards.shape[1] - 1)
    return chosen, keys.topk(k, dim=1).indices


# ---- log-probabilities ----------------------------------------------------------------------------------------

def _pieces(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Truncate to `max_length`: the prompt from the left (to at most half when both are long), then the completion."""
    if len(prompt) + len(completion) > max_length:
        keep = max(max_length - len(completion), max_length // 2)
        prompt = prompt[-keep:]
        completion = completion[:max_length - len(prompt)]
    return prompt, completion


def sequence_logprobs(model, sequences: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Σ log π(completion token | prefix) [S] of (prompt ids, completion ids) pairs, one right-padded forward."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in sequences]
    width = max(lengths)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    scored = torch.zeros(len(sequences), width, dtype=torch.bool)  # completion positions
    for row, (prompt, completion) in enumerate(sequences):
        ids[row, :lengths[row]] = torch.tensor(prompt + completion)
        mask[row, :lengths[row]] = 1
        scored[row, len(prompt):lengths[row]] = True
    first = min(len(p) for p, _ in sequences)  # no completion token before this column: skip its logits
    # logits of positions first-1 .. width-2 only (each predicts the next token); the prompt-only columns are skipped
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   logits_to_keep=width - first + 1).logits[:, :-1, :]
    targets = ids[:, first:].to(device)
    token_logp = torch.gather(logits.float(), 2, targets.unsqueeze(2)).squeeze(2) \
        - torch.logsumexp(logits.float(), dim=2)
    return (token_logp * scored[:, first:].to(device)).sum(dim=1)


@dataclass
class _Encoded:
    prompt: list[int]
    chosen: list[int]
    rejected: list[list[int]]

    def sequences(self, max_length: int) -> list[tuple[list[int], list[int]]]:
        return [_pieces(self.prompt, c, max_length) for c in [self.chosen, *self.rejected]]


def _encode(tokenizer, samples: Sequence[dict]) -> list[_Encoded]:
    eos = [tokenizer.eos_token_id]
    out = []
    for index, sample in enumerate(samples):
        missing = {"prompt", "chosen", "rejected"} - set(sample)
        if missing:
            raise ConfigError(f"S-DPO sample {index}: missing field(s) {sorted(missing)}")
        if isinstance(sample["rejected"], str) or len(sample["rejected"]) == 0:
            raise ConfigError(f"S-DPO sample {index}: 'rejected' must be a non-empty list of answers")
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        out.append(_Encoded(encode(sample["prompt"]), encode(sample["chosen"]) + eos,
                            [encode(r) + eos for r in sample["rejected"]]))
    return out


def _batch_logratios(model, batch: list[_Encoded], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completion log-probs of one micro-batch as (chosen [B], negatives [B, N] padded, mask [B, N])."""
    sequences = [s for e in batch for s in e.sequences(max_length)]
    flat = sequence_logprobs(model, sequences)
    width = max(len(e.rejected) for e in batch)
    rejected = torch.zeros(len(batch), width, device=flat.device)
    mask = torch.zeros(len(batch), width, dtype=torch.bool, device=flat.device)
    chosen, start = [], 0
    for row, e in enumerate(batch):
        chosen.append(flat[start])
        n = len(e.rejected)
        rejected[row, :n] = flat[start + 1:start + 1 + n]
        mask[row, :n] = True
        start += 1 + n
    return torch.stack(chosen), rejected, mask


# ---- the trainer -----------------------------------------------------------------------------------------------

def _total_steps(settings: SDPOConfig, n_samples: int, processes: int = 1) -> int:
    if settings.max_steps > 0:
        return settings.max_steps
    batches = math.ceil(n_samples / (settings.batch_size * processes))
    return max(1, math.ceil(settings.epochs * batches / settings.grad_accum))


def _trainable_parameters(model) -> list[torch.nn.Parameter]:
    if hasattr(model, "peft_config"):
        make_adapter_trainable(model)
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError("S-DPO: the model has no trainable parameters")
    return parameters


def _reference_logps(model, encoded: list[_Encoded], settings: SDPOConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """π_ref's completion log-probs per micro-batch position: the incoming model, once, without gradients."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(encoded), settings.batch_size):
            chosen, rejected, _ = _batch_logratios(model, encoded[start:start + settings.batch_size],
                                                   settings.max_length)
            out.extend(zip(chosen.cpu(), rejected.cpu()))
    return out


def train_sdpo(model, tokenizer, samples: Sequence[dict], settings: SDPOConfig | None = None, *,
               output_dir: str | Path, progress: bool = False) -> SDPOResult:
    """One S-DPO pass over {prompt, chosen, rejected: [answers]} samples; π_ref = the model as it comes in."""
    settings = settings or SDPOConfig()
    if len(samples) == 0:
        raise ConfigError("S-DPO needs at least one sample; got none")
    processes, rank, device = _placement(settings)
    model.to(device)
    encoded = _encode(tokenizer, samples)
    reference = _reference_logps(model, encoded, settings)
    parameters = _trainable_parameters(model)
    optimizer, scheduler, total = _optimizer_and_scheduler(parameters, settings, len(encoded), processes)
    generator = torch.Generator().manual_seed(settings.seed)
    logged = _StepLog()
    step, micro, started = 0, 0, time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)  # dropout draws
        while step < total:
            order = torch.randperm(len(encoded), generator=generator).tolist()  # one seeded order per epoch
            per_step = settings.batch_size * processes
            for start in range(0, len(encoded), per_step):
                rows = _rank_rows(order, start, per_step, processes, rank, settings.batch_size)
                loss, delta_w, delta_l, mask = _micro_batch_loss(model, encoded, reference, rows, settings, device)
                (loss / settings.grad_accum).backward()
                logged.add(loss, delta_w, delta_l, mask, settings.beta)
                micro += 1
                if micro % settings.grad_accum:
                    continue
                _optimizer_step(parameters, optimizer, scheduler, settings)
                step += 1
                if step % settings.logging_steps == 0 or step == total:
                    logged.flush(step, total, scheduler, processes, device, progress)
                if step >= total:
                    break
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    logged.log.append({"train_runtime": seconds, "train_loss": sum(logged.losses) / max(1, len(logged.losses)),
                       "step": step})
    model.eval()
    return SDPOResult(model=model, log_history=logged.log, seconds=seconds, output_dir=Path(output_dir))


def _placement(settings: SDPOConfig) -> tuple[int, int, torch.device]:
    """(processes, this process's rank, its device): (1, 0, cpu or cuda) in a plain run."""
    state = data_parallel_state(settings.device)  # None in a plain run
    processes, rank = (state.num_processes, state.process_index) if state is not None else (1, 0)
    device = state.device if state is not None else torch.device("cpu" if use_cpu(settings.device) else "cuda")
    return processes, rank, device


def _optimizer_and_scheduler(parameters: list[torch.nn.Parameter], settings: SDPOConfig, n_samples: int,
                             processes: int):
    """AdamW over `parameters` and its scheduler (linear warm-up over `warmup_ratio` of the steps); and the steps."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    total = _total_steps(settings, n_samples, processes)
    scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=math.ceil(settings.warmup_ratio
                                                                                           * total),
                              num_training_steps=total)
    return optimizer, scheduler, total


def _rank_rows(order: list[int], start: int, per_step: int, processes: int, rank: int, batch_size: int) -> list[int]:
    """This process's rows of the global batch at `start` of the seeded `order`."""
    rows = order[start:start + per_step]
    if processes > 1:  # rank r's slice of the global batch, wrapped around to a full one
        rows = [order[(start + rank * batch_size + j) % len(order)]
                for j in range(batch_size)]
    return rows


def _micro_batch_loss(model, encoded: list[_Encoded], reference: list[tuple[torch.Tensor, torch.Tensor]],
                      rows: list[int], settings: SDPOConfig, device: torch.device):
    """The S-DPO loss of one micro-batch, with Δ of its chosen [B] and negatives [B, N] and the negatives' mask."""
    chosen, rejected, mask = _batch_logratios(model, [encoded[i] for i in rows], settings.max_length)
    ref_chosen = torch.stack([reference[i][0] for i in rows]).to(device)
    ref_rejected = torch.zeros_like(rejected)
    for row, i in enumerate(rows):
        ref_rejected[row, :len(reference[i][1])] = reference[i][1].to(device)
    delta_w, delta_l = chosen - ref_chosen, rejected - ref_rejected
    loss = sdpo_loss(delta_w, delta_l, settings.beta, mask)
    return loss, delta_w, delta_l, mask


def _optimizer_step(parameters: list[torch.nn.Parameter], optimizer, scheduler, settings: SDPOConfig) -> None:
    """Average the gradients over the processes, clip them, step the optimizer and the schedule, zero them."""
    average_gradients(parameters)
    torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class _StepLog:
    """The logged steps (`log`, TrainResult's log_history) and their mean losses, and the sums since the last one."""

    log: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"loss": 0.0, "acc": 0.0, "margin": 0.0, "n": 0})

    def add(self, loss: torch.Tensor, delta_w: torch.Tensor, delta_l: torch.Tensor, mask: torch.Tensor,
            beta: float) -> None:
        """Add one micro-batch's loss, reward accuracy and reward margin."""
        stats = self.stats
        with torch.no_grad():
            margin = beta * (delta_w.unsqueeze(1) - delta_l)
            stats["loss"] += float(loss)
            stats["acc"] += float(((margin > 0) | ~mask).all(dim=1).float().mean())
            stats["margin"] += float((margin * mask).sum(dim=1).div(mask.sum(dim=1)).mean())
            stats["n"] += 1

    def flush(self, step: int, total: int, scheduler, processes: int, device: torch.device, progress: bool) -> None:
        """Log the means since the last logged step (averaged over the processes) and start new sums."""
        stats = self.stats
        if processes > 1:  # the mean over the processes
            summed = all_reduce_sum(torch.tensor([stats[k] for k in ("loss", "acc", "margin")],
                                                 device=device)) / processes
            stats.update(zip(("loss", "acc", "margin"), summed.tolist()))
        n = stats["n"]
        self.log.append({"step": step, "loss": stats["loss"] / n, "rewards/accuracies": stats["acc"] / n,
                         "rewards/margins": stats["margin"] / n, "learning_rate": scheduler.get_last_lr()[0]})
        self.losses.append(stats["loss"] / n)
        if progress:
            print(f"S-DPO step {step}/{total} loss {self.log[-1]['loss']:.4f}", flush=True)
        self.stats = {"loss": 0.0, "acc": 0.0, "margin": 0.0, "n": 0}
