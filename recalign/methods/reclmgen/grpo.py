"""GRPO through TRL's `GRPOTrainer`, with the same per-token rewards as our PPO (`recalign.methods.reclmgen.ppo.RewardFn`).

GRPO has no critic: each prompt gets `num_generations` sampled answers, every answer's reward is its sequence
reward (here: the sum of the per-token rewards `reward_fn` gives, `sequence_reward`), and the advantage is that
reward relative to its group. The policy is a LoRA adapter; the reference for the optional KL term (`beta` > 0) is
the same model with the adapter disabled, so TRL never rebuilds a reference from `config._name_or_path`.
CPU-safe arguments, progress bar and result type come from the shared plumbing (`recalign.llm.trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import Field

from recalign.errors import ConfigError
from recalign.llm.trainer import (
    LoraConfig,
    TrainerConfig,
    TrainResult,
    dataset_progress_bars,
    known_library_warnings_silenced,
    lora_config,
    make_adapter_trainable,
    merged_copy,
    model_or_folder,
    quiet_trainer,
    run_trainer,
)

__all__ = ["GRPOConfig", "GRPOResult", "sequence_reward", "grpo_config", "train_grpo"]

RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[torch.Tensor]]


class GRPOConfig(TrainerConfig):
    """GRPO hyper-parameters (shared fields: TrainerConfig; the rest map onto TRL's `GRPOConfig`)."""

    learning_rate: float = Field(1e-5, gt=0.0, description="AdamW learning rate")
    batch_size: int = Field(4, ge=1, description="answers per device per micro-batch (a multiple of "
                                                  "num_generations per generation batch)")
    num_generations: int = Field(4, ge=2, description="sampled answers per prompt (the group)")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per answer at most")
    temperature: float = Field(0.7, gt=0.0, description="sampling temperature")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")
    beta: float = Field(0.0, ge=0.0, description="KL coefficient against the reference (adapter disabled)")
    epsilon: float = Field(0.2, gt=0.0, description="policy ratio clip")
    num_iterations: int = Field(1, ge=1, description="updates per generation batch (μ)")
    loss_type: str = Field("dapo", description="TRL loss aggregation: 'grpo', 'dapo', 'dr_grpo', 'bnpo', ...")
    scale_rewards: str = Field("group", description="divide advantages by the group's std ('group'), the "
                                                    "batch's ('batch') or not at all ('none')")
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(r=4, alpha=2, dropout=0.0),
                               description="shape of a fresh policy adapter")


@dataclass
class GRPOResult(TrainResult):
    """A GRPO pass's `TrainResult`; its summary adds the first and last logged mean reward."""

    prefix: str = "grpo"

    @property
    def rewards(self) -> list[float]:
        """Mean reward per logged step, in order."""
        return [float(e["reward"]) for e in self.log_history if "reward" in e]

    def summary(self) -> dict:
        """Steps, first/last loss, seconds and first/last mean reward."""
        out = super().summary()
        if self.rewards:
            out["grpo_reward_first"], out["grpo_reward_last"] = self.rewards[0], self.rewards[-1]
        return out


def sequence_reward(reward_fn: RewardFn) -> Callable[..., list[float]]:
    """A TRL reward function: the sum of `reward_fn`'s per-token rewards of each answer."""

    def recalign_reward(prompts: list, completions: list, completion_ids: list, **_: Any) -> list[float]:
        rewards = list(reward_fn(list(prompts), list(completions), [list(map(int, ids)) for ids in completion_ids]))
        if len(rewards) != len(completions):
            raise ConfigError(f"reward_fn returned {len(rewards)} rewards for {len(completions)} answers")
        return [float(torch.as_tensor(r, dtype=torch.float32).sum()) for r in rewards]

    return recalign_reward


def grpo_config(settings: GRPOConfig, output_dir: str | Path):
    """The TRL `GRPOConfig` for `settings` with CPU-safe defaults (`recalign.llm.trainer.trainer_args`)."""
    from trl import GRPOConfig as TRLGRPOConfig

    shared = settings.trl_kwargs(output_dir)
    shared.pop("max_length")  # GRPO bounds the answer (max_completion_length), not prompt + answer
    return TRLGRPOConfig(num_generations=settings.num_generations, max_completion_length=settings.max_new_tokens,
                      temperature=settings.temperature, top_k=settings.top_k, beta=settings.beta,
                      epsilon=settings.epsilon, num_iterations=settings.num_iterations,
                      loss_type=settings.loss_type, scale_rewards=settings.scale_rewards,
                      remove_unused_columns=False, **shared)


def train_grpo(model_dir_or_model: Any, tokenizer, prompts: Sequence[str], reward_fn: RewardFn,
               settings: GRPOConfig | None = None, *, output_dir: str | Path, callbacks: list | None = None,
               progress: bool = False) -> GRPOResult:
    """Run GRPO over `prompts` (rendered prompt strings) with `reward_fn`'s summed per-token rewards.

    A plain model (or a model folder, loaded in float32) gets a fresh LoRA adapter (`settings.lora`); a PEFT model
    keeps training its active adapter. Returns the trained model and the log (loss, reward per step).
    """
    from datasets import Dataset as HFDataset
    from peft import PeftModel
    from trl import GRPOTrainer

    settings = settings or GRPOConfig()
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ConfigError("GRPO needs at least one prompt; got none")
    model = model_or_folder(model_dir_or_model, "GRPO model")
    peft_config = None
    if isinstance(model, PeftModel):
        if settings.beta > 0.0:  # TRL would copy the adapter as the reference; ours is the base model
            model = merged_copy(model)
            peft_config = lora_config(settings.lora)
        else:
            make_adapter_trainable(model)
    else:
        peft_config = lora_config(settings.lora)
    model = model.float()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = HFDataset.from_list([{"prompt": p} for p in prompts])
    with dataset_progress_bars(False), known_library_warnings_silenced():
        trainer = GRPOTrainer(model=model, reward_funcs=[sequence_reward(reward_fn)],
                              args=grpo_config(settings, output_dir), train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    quiet_trainer(trainer, progress, "GRPO")
    result = run_trainer(trainer, prefix="grpo")
    return GRPOResult(model=result.model, log_history=result.log_history, seconds=result.seconds,
                      output_dir=result.output_dir)


