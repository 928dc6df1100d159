"""A thin DPO step over TRL's `DPOTrainer` with LoRA and CPU-safe defaults (sigmoid loss; docs/systems/sprec.md).

The reference model π_ref is frozen and is, in order of preference:
- an explicit `ref_model` (its parameters are frozen here);
- for a PEFT model that already carries a trained adapter (the SFT adapter): a frozen copy of that adapter, which TRL
  adds as the adapter "ref" and which we delete again after training, so the returned model has one adapter;
- for a plain model with `lora` settings: the base model with the new adapter disabled.
A plain model without LoRA and without `ref_model` gets a frozen deep copy as reference, so TRL never rebuilds the
reference from `config._name_or_path` (which may not exist on disk).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pydantic import Field

from recalign.errors import ConfigError
from recalign.llm.trainer import (LoraConfig, TrainResult, dataset_progress_bars, freeze,
                                  known_library_warnings_silenced, lora_config, make_adapter_trainable,
                                  TrainerConfig, quiet_trainer, run_trainer)

LN2 = math.log(2.0)
__all__ = ["DPOConfig", "DPOResult", "LoraConfig", "dpo_config", "train_dpo"]


class DPOConfig(TrainerConfig):
    """Hyper-parameters of one DPO step (defaults follow SPRec's `train/dpo.py`; shared fields: TrainerConfig)."""

    beta: float = Field(0.1, gt=0.0, description="β of the sigmoid DPO loss")
    learning_rate: float = Field(2e-5, gt=0.0, description="AdamW learning rate")
    batch_size: int = Field(2, ge=1, description="pairs per device per micro-batch")
    grad_accum: int = Field(4, ge=1, description="gradient accumulation steps")
    max_length: int = Field(512, ge=8, description="max prompt+completion tokens (longer is truncated)")
    loss_type: str = Field("sigmoid", description="TRL loss type; 'sigmoid' is standard DPO")


@dataclass
class DPOResult(TrainResult):
    """A DPO pass's `TrainResult`; its summary adds the reward accuracy and margin of the last logged step."""

    prefix: str = "dpo"

    def summary(self) -> dict:
        """Steps, first/last loss, seconds, and reward accuracy/margin of the last logged step."""
        out = super().summary()
        steps = [e for e in self.log_history if "loss" in e and "train_loss" not in e]
        if steps:
            for key in ("rewards/accuracies", "rewards/margins"):
                if key in steps[-1]:
                    out[f"{self.prefix}_" + key.split("/")[1]] = float(steps[-1][key])
        return out


def dpo_config(settings: DPOConfig, output_dir: str | Path, progress: bool = False):
    """The TRL `DPOConfig` for `settings` with CPU-safe defaults (`recalign.llm.trainer.trainer_args`)."""
    from trl import DPOConfig as TRLDPOConfig

    return TRLDPOConfig(beta=settings.beta, loss_type=[settings.loss_type], remove_unused_columns=False,
                     **settings.trl_kwargs(output_dir))


def _check_pairs(pairs: Sequence[dict]) -> None:
    if len(pairs) == 0:
        raise ConfigError("DPO needs at least one preference pair; got none")
    for index, pair in enumerate(pairs):
        missing = {"prompt", "chosen", "rejected"} - set(pair)
        if missing:
            raise ConfigError(f"preference pair {index}: missing field(s) {sorted(missing)}")


def train_dpo(model, tokenizer, pairs: Sequence[dict], settings: DPOConfig | None = None, *,
              output_dir: str | Path, ref_model=None, lora: LoraConfig | None = None,
              callbacks: list | None = None, progress: bool = False) -> DPOResult:
    """Run one DPO pass over `pairs` ({prompt, chosen, rejected} strings or chat messages); returns model + log.

    String prompts must already be rendered with the chat template (one template for SFT, generation and DPO);
    completions get the EOS token appended by TRL.
    """
    from datasets import Dataset as HFDataset
    from peft import PeftModel
    from trl import DPOTrainer

    settings = settings or DPOConfig()
    _check_pairs(pairs)
    is_peft = isinstance(model, PeftModel)
    peft_config = None
    if ref_model is not None:
        if ref_model is model:
            raise ConfigError("ref_model must be a separate frozen copy, not the policy itself")
        freeze(ref_model)
    elif not is_peft:
        if lora is not None:
            peft_config = lora_config(lora)
        else:  # full fine-tuning: keep an in-memory frozen copy instead of a reload from _name_or_path
            ref_model = copy.deepcopy(model)
            freeze(ref_model)
    if is_peft:
        make_adapter_trainable(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = HFDataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    with dataset_progress_bars(False), known_library_warnings_silenced():  # TRL maps the dataset 3x: no bars
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=dpo_config(settings, output_dir, progress),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    quiet_trainer(trainer, progress, "DPO")
    result = run_trainer(trainer, prefix="dpo")
    trained = result.model
    if isinstance(trained, PeftModel) and "ref" in trained.peft_config:
        # TRL's frozen copy of the incoming adapter served as π_ref; drop it so saves/generation see one adapter.
        trained.set_adapter("default")
        trained.delete_adapter("ref")
    trained.eval()
    return DPOResult(model=trained, log_history=result.log_history, seconds=result.seconds,
                     output_dir=result.output_dir)
