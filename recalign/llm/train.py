"""Supervised fine-tuning: a thin wrapper over TRL's `SFTTrainer` with LoRA and CPU-safe defaults.

Examples are {prompt, completion} strings (the prompt already chat-rendered, see `recalign.llm.tasks`); TRL appends
EOS to the completion and, with `completion_only=True` (the default), sets the labels of every prompt token to
-100 so the loss is on the answer only. (SPRec's original SFT also trained on the prompt tokens, which teaches the
model to reproduce user histories instead of answering; recalign does not.)

CPU: fp32, no gradient checkpointing, no checkpoints written, no reporting. A GPU model loaded in bf16
(`load_model(dtype="auto")`) trains in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError
from recalign.llm.dpo import LoraSettings, _dataset_progress_bars, _use_cpu
from recalign.llm.models import known_library_warnings_silenced


class SFTSettings(BaseModel):
    """Hyper-parameters of one SFT pass (defaults: a LoRA run that fits a 2-core CPU)."""

    model_config = ConfigDict(extra="forbid")
    learning_rate: float = Field(2e-4, gt=0.0, description="AdamW learning rate (LoRA: 1e-4 .. 3e-4)")
    epochs: float = Field(1.0, gt=0.0, description="passes over the examples")
    max_steps: int = Field(-1, description="optimizer steps; -1 = derived from epochs")
    batch_size: int = Field(4, ge=1, description="examples per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_length: int = Field(256, ge=8, description="max prompt+completion tokens (longer is truncated on the right)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="linear warm-up share of the steps")
    lr_scheduler: str = Field("linear", description="transformers scheduler name")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    logging_steps: int = Field(1, ge=1, description="log the loss every N optimizer steps")
    completion_only: bool = Field(True, description="loss on completion tokens only (prompt labels = -100)")
    seed: int = Field(0, description="data order and dropout seed")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda'")


@dataclass
class SFTResult:
    """What an SFT pass returns: the trained model and its logged curve."""

    model: Any
    log_history: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """Training loss per logging step, in order."""
        return [float(e["loss"]) for e in self.log_history if "loss" in e and "train_loss" not in e]

    def summary(self) -> dict:
        """Steps, first/last logged loss and the train runtime."""
        losses = self.losses
        out: dict = {"sft_steps": len(losses)}
        if losses:
            out["sft_loss_first"], out["sft_loss_last"] = losses[0], losses[-1]
        for entry in self.log_history:
            if "train_runtime" in entry:
                out["sft_seconds"] = float(entry["train_runtime"])
        return out


def sft_config(settings: SFTSettings, output_dir: str | Path, progress: bool = False, bf16: bool = False):
    """The TRL `SFTConfig` for `settings`: CPU-safe (fp32, no checkpointing, no saves, no reporting)."""
    from trl import SFTConfig

    use_cpu = _use_cpu(settings.device)
    if bf16 and use_cpu:
        raise ConfigError("sft: bf16 training is for GPUs only")
    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=settings.lr_scheduler,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        completion_only_loss=settings.completion_only,
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=use_cpu,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=False,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def _check_examples(examples: Sequence[dict]) -> None:
    if len(examples) == 0:
        raise ConfigError("SFT needs at least one example; got none")
    for index, example in enumerate(examples):
        missing = {"prompt", "completion"} - set(example)
        if missing:
            raise ConfigError(f"SFT example {index}: missing field(s) {sorted(missing)}")


def make_sft_trainer(model, tokenizer, examples, settings: SFTSettings | None = None, *, output_dir: str | Path,
                     lora: LoraSettings | None = None, callbacks: list | None = None, progress: bool = False):
    """The TRL `SFTTrainer` (dataset tokenized, labels built) for `examples`, not yet trained.

    `examples`: a list of {prompt, completion} dicts or a `datasets.Dataset` with those columns. A model that is
    not a PEFT model gets a fresh LoRA adapter when `lora` is given (else it is fully fine-tuned).
    """
    from datasets import Dataset as HFDataset
    from peft import PeftModel
    from trl import SFTTrainer

    settings = settings or SFTSettings()
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
    peft_config = None
    if isinstance(model, PeftModel):
        _make_active_adapter_trainable(model)
    elif lora is not None:
        from recalign.llm.dpo import _lora_config

        peft_config = _lora_config(lora)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    with _dataset_progress_bars(progress):
        trainer = SFTTrainer(model=model, args=sft_config(settings, output_dir, progress, bf16=bf16),
                             train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
                             callbacks=callbacks)
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    return trainer


def train_sft(model, tokenizer, examples, settings: SFTSettings | None = None, *, output_dir: str | Path,
              lora: LoraSettings | None = None, callbacks: list | None = None, progress: bool = False) -> SFTResult:
    """Fine-tune on {prompt, completion} examples; returns the trained model (in eval mode) and the loss log."""
    with known_library_warnings_silenced():
        trainer = make_sft_trainer(model, tokenizer, examples, settings, output_dir=output_dir, lora=lora,
                                   callbacks=callbacks, progress=progress)
        trainer.train()
    trained = trainer.model
    trained.eval()
    # The Trainer set config.use_cache = False (its default); without the KV cache generation is ~30x slower.
    trained.config.use_cache = True
    if hasattr(trained, "get_base_model"):
        trained.get_base_model().config.use_cache = True
    return SFTResult(model=trained, log_history=list(trainer.state.log_history))


def _make_active_adapter_trainable(model) -> None:
    """A PeftModel loaded for inference has frozen LoRA weights; SFT must train the active adapter."""
    active = model.active_adapter
    for name, parameter in model.named_parameters():
        if f".{active}." in name and "lora_" in name:
            parameter.requires_grad_(True)
