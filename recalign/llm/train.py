"""Supervised fine-tuning: a thin wrapper over TRL's `SFTTrainer` with LoRA and CPU-safe defaults.

Examples are {prompt, completion} strings (the prompt already chat-rendered, see `recalign.llm.tasks`); TRL appends
EOS to the completion and, with `completion_only=True` (the default), sets the labels of every prompt token to
-100 so the loss is on the answer only. (SPRec's original SFT also trained on the prompt tokens, which teaches the
model to reproduce user histories instead of answering; recalign does not.)

CPU: fp32, no gradient checkpointing, no checkpoints written, no reporting unless `report_to` asks for it
(`recalign.llm.trainer`). A GPU model loaded in bf16 (`load_model(dtype="auto")`) trains in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from pydantic import Field

from recalign.errors import ConfigError
from recalign.llm.trainer import (LoraConfig, TrainerConfig, TrainResult, dataset_progress_bars,
                                  known_library_warnings_silenced, lora_config, make_adapter_trainable, quiet_trainer,
                                  run_trainer)

__all__ = ["SFTConfig", "SFTResult", "LoraConfig", "length_grouped_order", "sft_config", "make_sft_trainer",
           "train_sft"]


class SFTConfig(TrainerConfig):
    """Hyper-parameters of one SFT pass (defaults: a LoRA run that fits a 2-core CPU; shared fields: TrainerConfig)."""

    learning_rate: float = Field(2e-4, gt=0.0, description="AdamW learning rate (LoRA: 1e-4 .. 3e-4)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    completion_only: bool = Field(True, description="loss on completion tokens only (prompt labels = -100)")
    length_grouped: bool = Field(False, description="with shuffle: batches of examples of similar length (seeded "
                                                    "shuffle, sorted within windows of 50 batches, batches in "
                                                    "seeded order), so less padding is trained on "
                                                    "(benchmarks/sft_throughput.py)")


@dataclass
class SFTResult(TrainResult):
    """An SFT pass's `TrainResult` (summary keys sft_steps, sft_loss_first, sft_loss_last, sft_seconds)."""

    prefix: str = "sft"


def sft_config(settings: SFTConfig, output_dir: str | Path, progress: bool = False, bf16: bool = False):
    """The TRL `SFTConfig` for `settings`: CPU-safe (`recalign.llm.trainer.trainer_args`)."""
    from trl import SFTConfig as TRLSFTConfig

    kwargs = settings.trl_kwargs(output_dir, bf16=bf16)
    if settings.length_grouped and settings.shuffle:  # the examples come in length-grouped order (make_sft_trainer)
        kwargs["train_sampling_strategy"] = "sequential"
    return TRLSFTConfig(weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
                        completion_only_loss=settings.completion_only, **kwargs)


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, window: int = 50) -> list[int]:
    """An example order whose batches hold examples of similar length: a seeded shuffle, each window of `window`
    batches sorted by length and cut into batches, then the batches in a seeded random order (every example once).
    The trainer then reads the examples in this order (sequential sampler), the same order in every epoch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    span = max(1, batch_size * window)
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span].tolist(), key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [i for b in rng.permutation(len(batches)) for i in batches[b]]


def _check_examples(examples: Sequence[dict]) -> None:
    if len(examples) == 0:
        raise ConfigError("SFT needs at least one example; got none")
    for index, example in enumerate(examples):
        missing = {"prompt", "completion"} - set(example)
        if missing:
            raise ConfigError(f"SFT example {index}: missing field(s) {sorted(missing)}")


def make_sft_trainer(model, tokenizer, examples, settings: SFTConfig | None = None, *, output_dir: str | Path,
                     lora: LoraConfig | None = None, callbacks: list | None = None, progress: bool = False):
    """The TRL `SFTTrainer` (dataset tokenized, labels built) for `examples`, not yet trained.

    `examples`: a list of {prompt, completion} dicts or a `datasets.Dataset` with those columns. A model that is
    not a PEFT model gets a fresh LoRA adapter when `lora` is given (else it is fully fine-tuned).
    """
    from datasets import Dataset as HFDataset
    from peft import PeftModel
    from trl import SFTTrainer

    settings = settings or SFTConfig()
    if isinstance(examples, HFDataset):
        missing = {"prompt", "completion"} - set(examples.column_names)
        if missing:
            raise ConfigError(f"SFT dataset: missing column(s) {sorted(missing)}")
        if len(examples) == 0:
            raise ConfigError("SFT needs at least one example; got none")
        data = examples.select_columns(["prompt", "completion"])
    else:
        _check_examples(examples)
        data = HFDataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if settings.length_grouped and settings.shuffle:
        lengths = [len(ids) for ids in tokenizer([p + c for p, c in zip(data["prompt"], data["completion"])],
                                                 add_special_tokens=False)["input_ids"]]
        data = data.select(length_grouped_order(lengths, settings.batch_size * settings.grad_accum, settings.seed))
    peft_config = None
    if isinstance(model, PeftModel):
        make_adapter_trainable(model)
    elif lora is not None:
        peft_config = lora_config(lora)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    with dataset_progress_bars(False):  # tokenising bars between the training bar are noise
        trainer = SFTTrainer(model=model, args=sft_config(settings, output_dir, progress, bf16=bf16),
                             train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
                             callbacks=callbacks)
    return quiet_trainer(trainer, progress, "SFT")


def train_sft(model, tokenizer, examples, settings: SFTConfig | None = None, *, output_dir: str | Path,
              lora: LoraConfig | None = None, callbacks: list | None = None, progress: bool = False) -> SFTResult:
    """Fine-tune on {prompt, completion} examples; returns the trained model (in eval mode) and the loss log."""
    with known_library_warnings_silenced():
        trainer = make_sft_trainer(model, tokenizer, examples, settings, output_dir=output_dir, lora=lora,
                                   callbacks=callbacks, progress=progress)
    result = run_trainer(trainer, prefix="sft")
    return SFTResult(model=result.model, log_history=result.log_history, seconds=result.seconds,
                     output_dir=result.output_dir)
