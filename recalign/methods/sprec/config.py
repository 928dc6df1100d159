"""SPRec's settings: the run (`SPRecConfig`), its decoding (`SPRecGenerationConfig`) and the recipe stage's params
(`SPRecStageConfig`). Defaults and the original's values side by side: docs/systems/sprec.md."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recalign.config import stage_params_model
from recalign.llm.backends import GenerationBackend
from recalign.llm.dpo import DPOConfig
from recalign.llm.grounding import GroundingConfig
from recalign.llm.train import SFTConfig
from recalign.llm.trainer import LoraConfig

__all__ = ["VARIANTS", "SPRecConfig", "SPRecGenerationConfig", "SPRecStageConfig"]

VARIANTS = ("sft", "dpo_random", "sprec")


class SPRecGenerationConfig(BaseModel):
    """Greedy decoding of one title per prompt."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(32, ge=1, description="tokens per answer (SPRec: 128 for pairs, 32 for evaluation)")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")


class SPRecConfig(BaseModel):
    """Everything one SPRec run depends on; defaults follow the original where it is sound."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("tiny", description="base model: HF id, local folder, .gguf file, or 'tiny' (random Llama)")
    variants: list[Literal["sft", "dpo_random", "sprec"]] = Field(
        default_factory=lambda: list(VARIANTS), description="which variants to run; 'sft' is the stage-0 model")
    iterations: int = Field(5, ge=1, description="self-play iterations N (SPRec README: 5)")
    n_pairs: int = Field(2048, ge=1, description="train prompts sampled per iteration (SPRec: 2048)")
    max_history: int = Field(10, ge=1, description="most recent history titles in a prompt")
    train_users: Literal["all", "train_only"] = Field(
        "all", description="rows from every user's train sequence, or only users without valid/test items "
                           "(SPRec's separate Alpaca train file)")
    sft_rows: int = Field(4096, ge=1, description="train rows sampled for the stage-0 SFT (SPRec: 4096)")
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=4.0, learning_rate=3e-4, batch_size=4,
                                                             grad_accum=4, max_length=512),
                           description="stage-0 SFT (SPRec: 4 epochs, lr 3e-4, 4x4)")
    sft_step: SFTConfig | None = Field(
        default_factory=lambda: SFTConfig(epochs=1.0, learning_rate=2e-5, batch_size=4, grad_accum=4,
                                          max_length=512),
        description="per-iteration SFT on the positives before DPO (null = skip; SPRec: 1 epoch, lr 2e-5)")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="the DPO step (β = 0.1, lr 2e-5, 2×4)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter (r 16, α 32, dropout 0.05)")
    grounding: GroundingConfig = Field(default_factory=lambda: GroundingConfig(kind="embedding"),
                                       description="generated title -> catalog items (SPRec: embedding k-NN)")
    pair_generation: SPRecGenerationConfig = Field(
        default_factory=lambda: SPRecGenerationConfig(max_new_tokens=64),
        description="decoding of the self-play negatives")
    eval_generation: SPRecGenerationConfig = Field(default_factory=SPRecGenerationConfig,
                                                   description="decoding at evaluation")
    backend: GenerationBackend = Field(default_factory=GenerationBackend,
                                       description="engine of the evaluation answers: transformers | vllm | openai | "
                                                   "auto (recalign.llm.backends); the self-play negatives, SFT and "
                                                   "DPO always use transformers")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="cut-offs K")
    eval_part: Literal["valid", "test"] = Field("test", description="split part evaluated after every iteration")
    eval_rows: int | None = Field(None, ge=1, description="evaluate a seeded subsample of this many rows (null = all)")
    genres: list[str] | None = Field(None, description="tracked genres G for MGU/DGU (null = every item category)")
    check_pairs: bool = Field(True, description="drop pairs whose rejected item is ungrounded or equals chosen; "
                                                "false = the original (raw generated title, no checks)")
    seed: int = Field(0, description="seed of the row samples, random negatives and training")
    compare_resamples: int = Field(1000, ge=0, description="bootstrap resamples and permutations of the paired "
                                                           "comparison of every checkpoint with SFT (0 = skip)")


# The recipe stage's params: SPRecConfig without the recipe-wide eval settings (cut-offs, users), plus `protocol`.
SPRecStageConfig = stage_params_model(
    SPRecConfig, "SPRecStageConfig", doc="Params of a `sprec` recipe stage (cut-offs and users: the recipe's eval).",
    protocol=(Literal["recipe", "sprec_rows"], Field(
        "recipe", description="'recipe': every variant and iteration scored by the recipe's evaluator on its users "
                              "(comparable); 'sprec_rows': the paper's own rows and list metrics (a parity protocol)")))
