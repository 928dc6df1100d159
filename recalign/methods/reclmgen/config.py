"""The settings of RecLM-gen (recipe kind `reclmgen`, alias `controllable`): `RecLMGenConfig` is everything one run
depends on, `RecLMGenStageConfig` the params of a recipe stage. The blocks' own settings stay beside them:
`PPOConfig` (`recalign.methods.reclmgen.ppo`), `GRPOConfig` (`recalign.methods.reclmgen.grpo`), `SFTConfig`,
`LoraConfig`, `GroundingConfig` and `GenerationBackend` (`recalign.llm`). Defaults are CPU-sized; the paper's values
are in the descriptions and in docs/systems/reclmgen.md ("Defaults and where they live").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from recalign.errors import ConfigError
from recalign.llm.backends import GenerationBackend
from recalign.llm.grounding import GroundingConfig
from recalign.llm.train import SFTConfig
from recalign.llm.trainer import LoraConfig
from recalign.methods.reclmgen.grpo import GRPOConfig
from recalign.methods.reclmgen.ppo import PPOConfig
from recalign.methods.reclmgen.rewards import ALPHA
from recalign.methods.reclmgen.tasks import SFT_TASKS, TEST_TASKS, parse_test_task

__all__ = ["RecLMGenConfig", "RecLMGenStageConfig"]


class RecLMGenConfig(BaseModel):
    """Everything one RecLM-gen run depends on; defaults are CPU-sized (the paper's values in the descriptions)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="base model: HF id, local folder, .gguf, 'smollm2' or 'tiny' "
                                                "(null: the init_from stage's model, else 'smollm2')")
    teacher: str = Field(description="the teacher: a recipe teacher stage name, a teacher stage folder, or "
                                     "http(s)://host:port of `recalign serve teacher`")
    init_from: str | None = Field(None, description="an earlier controllable stage whose SFT model this stage "
                                                    "starts from (its own SFT is skipped)")
    max_history: int = Field(10, ge=1, description="most recent history items in a prompt (paper: 10)")
    # SFT on the task mix (docs/systems/reclmgen.md, step 3)
    sft_epochs: int = Field(1, ge=1, description="SFT epochs, the task mix regenerated each epoch (paper: 40)")
    sft_rows: int | None = Field(256, ge=1, description="rows sampled from each epoch's mix (null = all rows)")
    sft_tasks: list[str] = Field(default_factory=lambda: list(SFT_TASKS),
                                 description=f"SFT task families, some of {list(SFT_TASKS)}")
    control_re_items: int | None = Field(200, ge=1, description="items drawn for ControlRec per epoch (null = all)")
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=1.0, learning_rate=1e-3, batch_size=4,
                                                                 grad_accum=1, max_length=512),
                             description="one SFT pass per epoch (paper: lr 1e-3, batch 16 x 4 GPUs)")
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(r=16, alpha=8, dropout=0.05),
                               description="the SFT adapter (paper: r 16, α 8 on every linear layer)")
    # RL with per-item rewards (docs/systems/reclmgen.md, step 4 and the reward formulas)
    algorithm: Literal["ppo", "grpo", "none"] = Field("ppo", description="RL after SFT: ppo | grpo | none")
    reward: Literal["fine_grained", "list"] = Field(
        "fine_grained", description="fine_grained: item rewards on each item's last token + list reward last; "
                                    "list: the list reward alone on the last token")
    alpha: float = Field(ALPHA, ge=0.0, le=1.0, description="weight of the rank score vs the task score (paper: 0.5)")
    rl_iterations: int = Field(4, ge=1, description="RL iterations (each saved; paper: thousands of batches)")
    rl_episodes: int = Field(1, ge=1, description="episodes of RL rows (each task once per user per episode)")
    rl_rows: int | None = Field(256, ge=1, description="RL rows sampled from the episodes (null = all)")
    prompts_per_iteration: int = Field(8, ge=1, description="prompts drawn per RL iteration (PPO and GRPO)")
    ppo: PPOConfig = Field(default_factory=lambda: PPOConfig(max_new_tokens=128, mini_batch_size=4,
                                                                 learning_rate=1e-5, generation_batch_size=8),
                             description="PPO settings (paper: kl 0.3, γ 0.99, λ 1, clip 0.2, 4 epochs, "
                                         "KL stop 0.05)")
    grpo: GRPOConfig = Field(default_factory=lambda: GRPOConfig(max_new_tokens=128, batch_size=4,
                                                                    num_generations=4, learning_rate=1e-5),
                               description="GRPO settings (TRL), same reward summed over tokens")
    # the test tasks (docs/systems/reclmgen.md, step 5)
    test_tasks: list[str] = Field(default_factory=lambda: list(TEST_TASKS),
                                  description=f"test tasks, some of {list(TEST_TASKS)} (or lp_P / mp_P / ep_P)")
    max_new_tokens: int = Field(160, ge=8, description="tokens per 10-item test answer (scaled by k / 10; "
                                                       "~14 per MovieLens title)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call at test time")
    backend: GenerationBackend = Field(default_factory=GenerationBackend,
                                       description="engine of the test answers: transformers | vllm | openai | auto "
                                                   "(recalign.llm.backends); SFT, PPO and GRPO sampling always use "
                                                   "transformers")
    grounding: GroundingConfig = Field(default_factory=lambda: GroundingConfig(kind="fuzzy", threshold=3),
                                       description="test-time grounding (paper: exact, then Levenshtein <= 3)")
    n_negatives: int = Field(100, ge=1, description="SeqRanking: random negatives beside the target")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda'")
    seed: int | None = Field(None, description="seed of rows, adapters, sampling (default: the recipe seed)")

    @field_validator("sft_tasks")
    @classmethod
    def _known_sft_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in SFT_TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown or no SFT tasks {unknown}; expected some of {list(SFT_TASKS)}")
        return tasks

    @field_validator("test_tasks")
    @classmethod
    def _known_test_tasks(cls, tasks: list[str]) -> list[str]:
        for task in tasks:
            try:
                parse_test_task(task)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError("name each test task once, at least one")
        return tasks


class RecLMGenStageConfig(RecLMGenConfig):
    """Params of a `reclmgen` (alias `controllable`) stage: the method's config, field for field; the evaluated
    users and cut-offs come from the recipe's eval section."""
