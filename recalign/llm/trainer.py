"""Shared plumbing of the LLM trainers (SFT, DPO and the coming PPO/GRPO/S-DPO): one place for

- CPU-safe trainer arguments (`trainer_args`): fp32 on CPU, `use_cpu` when there is no CUDA, no gradient
  checkpointing on CPU, never fp16, no checkpoints written, optional `report_to`;
- LoRA settings (`LoraConfig`) and the adapter helpers (`attach_lora`, `load_adapter`, `save_adapter`,
  `merged_copy`, `reference_adapter_disabled`, `make_adapter_trainable`);
- one result type (`TrainResult`: the trained model, losses per logged step, seconds, output folder, log);
- one clean progress display (`quiet_trainer`): the transformers printer/tqdm callbacks are removed and, when
  progress is on, one rich bar shows the step and the current loss (no raw `{'loss': ...}` dicts on stdout).

This module imports nothing else from `recalign.llm`, so every trainer and `models` can import it (no cycles).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError
from recalign.io import atomic_folder
from recalign.processes import world_size

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "csv")

__all__ = [
    "LoraConfig", "TrainResult", "use_cpu", "report_to_value", "trainer_args", "lora_config", "attach_lora",
    "load_adapter", "save_adapter", "merged_copy", "reference_adapter_disabled", "make_adapter_trainable",
    "freeze", "TrainerConfig", "quiet_trainer", "LossProgress", "dataset_progress_bars", "known_library_warnings_silenced",
    "run_trainer", "data_parallel_state", "all_reduce_sum", "all_gather_cat",
    "average_gradients",
]


# ---- settings ---------------------------------------------------------------------------------------------

class LoraConfig(BaseModel):
    """LoRA adapter shape for a fresh adapter (only used when the model is not already a PEFT model)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1, description="LoRA rank (SPRec: 16)")
    alpha: int = Field(32, ge=1, description="LoRA alpha (SPRec: 32)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear'")


class TrainerConfig(BaseModel):
    """Settings every LLM trainer shares (SFT, DPO and the coming PPO/GRPO/S-DPO subclass it)."""

    model_config = ConfigDict(extra="forbid")
    learning_rate: float = Field(2e-4, gt=0.0, description="AdamW learning rate")
    epochs: float = Field(1.0, gt=0.0, description="passes over the training examples")
    max_steps: int = Field(-1, description="optimizer steps; -1 = derived from epochs")
    batch_size: int = Field(4, ge=1, description="examples per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_length: int = Field(256, ge=8, description="max prompt+completion tokens (longer is truncated)")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="linear warm-up share of the steps")
    lr_scheduler: str = Field("linear", description="transformers scheduler name")
    logging_steps: int = Field(1, ge=1, description="log the loss every N optimizer steps")
    seed: int = Field(0, description="data order and dropout seed")
    shuffle: bool = Field(True, description="shuffle the examples (seeded); False keeps their order")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda'")
    report_to: str = Field("none", description="trainer logging integration: 'none' or 'tensorboard' (installed)")

    def trl_kwargs(self, output_dir: str | Path, bf16: bool = False) -> dict[str, Any]:
        """Keyword arguments of any TRL `*Config` for the shared fields, CPU-safe (`trainer_args`)."""
        return dict(
            learning_rate=self.learning_rate,
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum,
            max_length=self.max_length,
            logging_steps=self.logging_steps,
            warmup_steps=self.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            lr_scheduler_type=self.lr_scheduler,
            train_sampling_strategy="random" if self.shuffle else "sequential",
            **trainer_args(output_dir=output_dir, device=self.device, bf16=bf16, report_to=self.report_to,
                           seed=self.seed),
        )


def use_cpu(device: str) -> bool:
    """True when training runs on the CPU: device 'cpu', or 'auto' without CUDA."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got '{device}'")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def report_to_value(report_to: str) -> str:
    """The transformers `report_to` value; an integration that is not installed is a config error."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"report_to: expected one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("report_to: 'tensorboard' needs the tensorboard package (pip install tensorboard)")
    if report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("report_to: 'wandb' needs the wandb package")
    return report_to


def trainer_args(*, output_dir: str | Path, device: str = "auto", bf16: bool = False, report_to: str = "none",
                 seed: int = 0) -> dict[str, Any]:
    """CPU-safe keyword arguments shared by every TRL/transformers `*Config` (merge with the trainer's own)."""
    cpu = use_cpu(device)
    if bf16 and cpu:
        raise ConfigError("bf16 training is for GPUs only; on CPU recalign trains in float32")
    return dict(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        use_cpu=cpu,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=False,
        activation_checkpointing=False,  # the new name; setting it too keeps transformers from warning
        report_to=report_to_value(report_to),
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,  # our own progress bar (`quiet_trainer`) replaces tqdm and the printer callback
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # LoRA/full training uses every trainable weight (and DDP is faster so)
    )


# ---- processes ------------------------------------------------------------------------------------------------

def data_parallel_state(device: str):
    """accelerate's `PartialState` of this launch (process group: gloo on the CPU, NCCL on GPUs), or None when
    this is the only process. Our own loops (PPO) use it; the TRL trainers set it up themselves."""
    if world_size() == 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=use_cpu(device))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over every process of the launch (the tensor itself in a plain run)."""
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_initialized():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `parameters` over the processes (one all-reduce, flattened); DDP's averaging for
    loops that DDP cannot wrap. A no-op in a plain run."""
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / dist.get_world_size()
    for parameter, piece in zip(parameters, flat.split([g.numel() for g in grads])):
        parameter.grad = piece.view_as(parameter).clone()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` (same shape everywhere) concatenated along dim 0, in rank order."""
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


# ---- results ------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a trainer call returns: the trained model (eval mode), the per-step log, seconds and output folder."""

    model: Any
    log_history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    output_dir: Path | None = None
    prefix: str = "train"

    @property
    def losses(self) -> list[float]:
        """Training loss per logged step, in order."""
        return [float(e["loss"]) for e in self.log_history if "loss" in e and "train_loss" not in e]

    def summary(self) -> dict:
        """Steps, first/last logged loss and seconds, keys prefixed with `prefix` (e.g. sft_loss_last)."""
        losses = self.losses
        out: dict = {f"{self.prefix}_steps": len(losses)}
        if losses:
            out[f"{self.prefix}_loss_first"], out[f"{self.prefix}_loss_last"] = losses[0], losses[-1]
        out[f"{self.prefix}_seconds"] = float(self.seconds)
        for entry in self.log_history:
            if "train_runtime" in entry:
                out[f"{self.prefix}_seconds"] = float(entry["train_runtime"])
        return out


# ---- adapters ----------------------------------------------------------------------------------------------

def lora_config(lora: LoraConfig):
    """The PEFT `LoraConfig` of `lora` for a causal LM."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def attach_lora(model, lora: LoraConfig, seed: int = 0):
    """Wrap `model` with a fresh, trainable LoRA adapter (PEFT); the A matrices are initialised from `seed`."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]), known_library_warnings_silenced():
        torch.manual_seed(seed)
        return get_peft_model(model, lora_config(lora))


def load_adapter(model, folder: str | os.PathLike, trainable: bool = False):
    """A saved LoRA adapter (`folder` with adapter_config.json) on top of `model`."""
    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").is_file():
        raise ConfigError(f"model.adapter: {folder} has no adapter_config.json")
    with known_library_warnings_silenced():
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


def merged_copy(model):
    """A copy of `model` with its LoRA adapter folded into the weights (a plain model is returned as is)."""
    import copy

    from peft import PeftModel

    return copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model


def save_adapter(model, tokenizer, folder: str | os.PathLike, merge: bool = False) -> Path:
    """Save the adapter (or, with `merge`, the merged full model) + tokenizer; temp folder renamed into place."""
    folder = Path(folder)
    to_save = merged_copy(model) if merge else model
    with atomic_folder(folder) as tmp:
        to_save.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


@contextlib.contextmanager
def reference_adapter_disabled(model) -> Iterator[Any]:
    """Within the block `model` computes with its adapter off: the frozen base model as π_ref (PEFT or plain)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def make_adapter_trainable(model) -> None:
    """A PeftModel loaded for inference has frozen LoRA weights; training must update the active adapter."""
    active = model.active_adapter
    for name, parameter in model.named_parameters():
        if f".{active}." in name and "lora_" in name:
            parameter.requires_grad_(True)


def freeze(model) -> None:
    """No gradients and eval mode (a reference model)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()


# ---- progress and quiet libraries ----------------------------------------------------------------------------

def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class LossProgress:
    """A transformers callback: one rich progress bar with the optimizer step and the last logged loss."""

    def __new__(cls, description: str = "training"):
        base = _trainer_callback_base()

        class _LossProgress(base):  # built lazily so importing this module does not import transformers
            def __init__(self) -> None:
                self.description, self._progress, self._task, self.last_loss = description, None, None, None

            def on_train_begin(self, args, state, control, **kwargs):
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("{task.fields[loss]}"), TimeElapsedColumn())
                self._progress.start()
                self._task = self._progress.add_task(self.description, total=state.max_steps or None, loss="")

            def on_step_end(self, args, state, control, **kwargs):
                if self._progress is not None:
                    self._progress.update(self._task, completed=state.global_step)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if self._progress is not None and logs and "loss" in logs:
                    self.last_loss = float(logs["loss"])
                    self._progress.update(self._task, loss=f"loss {self.last_loss:.4f}")

            def on_train_end(self, args, state, control, **kwargs):
                if self._progress is not None:
                    self._progress.update(self._task, completed=state.global_step)
                    self._progress.stop()
                    self._progress = None

        return _LossProgress()


def quiet_trainer(trainer, progress: bool, description: str = "training"):
    """Remove the transformers printer/tqdm callbacks; with `progress`, add one `LossProgress` bar instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # prints every log dict when tqdm is off
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(LossProgress(description))
    return trainer


@contextlib.contextmanager
def dataset_progress_bars(enabled: bool) -> Iterator[None]:
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


@contextlib.contextmanager
def known_library_warnings_silenced() -> Iterator[None]:
    """Hide warnings raised inside transformers/TRL/PEFT that a user of recalign cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def model_or_folder(model_dir_or_model: Any, what: str = "model"):
    """A loaded model as is; a folder with config.json loaded in float32 (`what` names it in the error)."""
    if not isinstance(model_dir_or_model, (str, os.PathLike)):
        return model_dir_or_model
    folder = Path(model_dir_or_model)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{what}: {folder} is not a model folder (no config.json)")
    from transformers import AutoModelForCausalLM

    with known_library_warnings_silenced():
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def run_trainer(trainer, prefix: str = "train") -> TrainResult:
    """`trainer.train()`, then the model in eval mode with its KV cache back on, as a `TrainResult`."""
    start = time.perf_counter()
    with known_library_warnings_silenced():
        trainer.train()
    seconds = time.perf_counter() - start
    trained = trainer.model
    trained.eval()
    # The Trainer set config.use_cache = False (its default); without the KV cache generation is ~30x slower.
    trained.config.use_cache = True
    if hasattr(trained, "get_base_model"):
        trained.get_base_model().config.use_cache = True
    return TrainResult(model=trained, log_history=list(trainer.state.log_history), seconds=seconds,
                       output_dir=Path(trainer.args.output_dir), prefix=prefix)
