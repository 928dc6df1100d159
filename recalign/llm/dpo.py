"""A thin DPO step over TRL's `DPOTrainer` with LoRA and CPU-safe defaults (systems.md §1.1, sigmoid loss).

The reference model π_ref is frozen and is, in order of preference:
- an explicit `ref_model` (its parameters are frozen here);
- for a PEFT model that already carries a trained adapter (the SFT adapter): a frozen copy of that adapter, which TRL
  adds as the adapter "ref" and which we delete again after training, so the returned model has one adapter;
- for a plain model with `lora` settings: the base model with the new adapter disabled.
A plain model without LoRA and without `ref_model` gets a frozen deep copy as reference, so TRL never rebuilds the
reference from `config._name_or_path` (which may not exist on disk).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError

LN2 = math.log(2.0)


class LoraSettings(BaseModel):
    """LoRA adapter shape for a fresh adapter (only used when the model is not already a PEFT model)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1, description="LoRA rank (SPRec: 16)")
    alpha: int = Field(32, ge=1, description="LoRA alpha (SPRec: 32)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear'")


class DPOSettings(BaseModel):
    """Hyper-parameters of one DPO step (defaults follow SPRec's `train/dpo.py`)."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0.0, description="β of the sigmoid DPO loss")
    learning_rate: float = Field(2e-5, gt=0.0, description="AdamW learning rate")
    epochs: float = Field(1.0, gt=0.0, description="passes over the preference pairs")
    max_steps: int = Field(-1, description="optimizer steps; -1 = derived from epochs")
    batch_size: int = Field(2, ge=1, description="pairs per device per micro-batch")
    grad_accum: int = Field(4, ge=1, description="gradient accumulation steps")
    max_length: int = Field(512, ge=8, description="max prompt+completion tokens (longer is truncated)")
    logging_steps: int = Field(1, ge=1, description="log loss every N optimizer steps")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="linear warm-up share of the steps")
    lr_scheduler: str = Field("linear", description="transformers scheduler name")
    seed: int = Field(0, description="data order and dropout seed")
    loss_type: str = Field("sigmoid", description="TRL loss type; 'sigmoid' is standard DPO")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda'")


@dataclass
class DPOResult:
    """What a DPO step returns: the trained model and its logged curve."""

    model: Any
    log_history: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """Training loss per logging step, in order."""
        return [float(e["loss"]) for e in self.log_history if "loss" in e and "train_loss" not in e]

    def summary(self) -> dict:
        """First/last loss, reward accuracy and margin of the last logged step."""
        steps = [e for e in self.log_history if "loss" in e and "train_loss" not in e]
        out: dict = {"dpo_steps": len(steps)}
        if steps:
            out["dpo_loss_first"] = float(steps[0]["loss"])
            out["dpo_loss_last"] = float(steps[-1]["loss"])
            for key in ("rewards/accuracies", "rewards/margins"):
                if key in steps[-1]:
                    out["dpo_" + key.split("/")[1]] = float(steps[-1][key])
        return out


def _use_cpu(device: str) -> bool:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"dpo.device: expected 'auto', 'cpu' or 'cuda', got '{device}'")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def dpo_config(settings: DPOSettings, output_dir: str | Path, progress: bool = False):
    """The TRL `DPOConfig` for `settings` with CPU-safe defaults (fp32, no checkpointing, no saving, no reporting)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        beta=settings.beta,
        loss_type=[settings.loss_type],
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        logging_steps=settings.logging_steps,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=settings.lr_scheduler,
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=_use_cpu(settings.device),
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        activation_checkpointing=False,  # the new name; setting it too keeps transformers from warning
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def _lora_config(lora: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def _freeze(model) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()


def _check_pairs(pairs: Sequence[dict]) -> None:
    if len(pairs) == 0:
        raise ConfigError("DPO needs at least one preference pair; got none")
    for index, pair in enumerate(pairs):
        missing = {"prompt", "chosen", "rejected"} - set(pair)
        if missing:
            raise ConfigError(f"preference pair {index}: missing field(s) {sorted(missing)}")


def train_dpo(model, tokenizer, pairs: Sequence[dict], settings: DPOSettings | None = None, *,
              output_dir: str | Path, ref_model=None, lora: LoraSettings | None = None,
              callbacks: list | None = None, progress: bool = False) -> DPOResult:
    """Run one DPO pass over `pairs` ({prompt, chosen, rejected} strings or chat messages); returns model + log.

    String prompts must already be rendered with the chat template (one template for SFT, generation and DPO);
    completions get the EOS token appended by TRL.
    """
    from datasets import Dataset as HFDataset
    from peft import PeftModel
    from trl import DPOTrainer

    settings = settings or DPOSettings()
    _check_pairs(pairs)
    is_peft = isinstance(model, PeftModel)
    peft_config = None
    if ref_model is not None:
        if ref_model is model:
            raise ConfigError("ref_model must be a separate frozen copy, not the policy itself")
        _freeze(ref_model)
    elif not is_peft:
        if lora is not None:
            peft_config = _lora_config(lora)
        else:  # full fine-tuning: keep an in-memory frozen copy instead of a reload from _name_or_path
            ref_model = copy.deepcopy(model)
            _freeze(ref_model)
    if is_peft:
        _make_active_adapter_trainable(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = HFDataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    from recalign.llm.models import known_library_warnings_silenced

    with _dataset_progress_bars(progress), known_library_warnings_silenced():  # TRL maps the dataset 3x, each with a bar
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=dpo_config(settings, output_dir, progress),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    with known_library_warnings_silenced():
        trainer.train()
    trained = trainer.model
    if isinstance(trained, PeftModel) and "ref" in trained.peft_config:
        # TRL's frozen copy of the incoming adapter served as π_ref; drop it so saves/generation see one adapter.
        trained.set_adapter("default")
        trained.delete_adapter("ref")
    trained.eval()
    return DPOResult(model=trained, log_history=list(trainer.state.log_history))


@contextlib.contextmanager
def _dataset_progress_bars(enabled: bool):
    """Turn the `datasets` progress bars off for the block when `enabled` is False, then restore them."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            ds_logging.enable_progress_bar()


def _make_active_adapter_trainable(model) -> None:
    """A PeftModel loaded for inference has frozen LoRA weights; DPO must train the active adapter."""
    active = model.active_adapter
    for name, parameter in model.named_parameters():
        if f".{active}." in name and "lora_" in name:
            parameter.requires_grad_(True)
