"""TrackRec's settings: the LLM loop (`TrackRecConfig`) with its teacher (`CoTTeacherConfig`) and CoT decoding
(`CoTDecodingConfig`), and the recipe stage's params (`TrackRecStageConfig`: the loop plus how impressions are built).

S-DPO's settings are `recalign.methods.trackrec.sdpo.SDPOConfig` (beside the block they configure) and the CTR
side's are `recalign.methods.trackrec.ctr.train.CTRConfig`. Defaults and the original's values side by side:
docs/systems/trackrec.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recalign.llm.backends import GenerationBackend
from recalign.llm.train import SFTConfig
from recalign.llm.trainer import LoraConfig
from recalign.methods.trackrec.sdpo import SDPOConfig

__all__ = ["STAND_IN", "CoTTeacherConfig", "CoTDecodingConfig", "TrackRecConfig", "TrackRecStageConfig",
           "STAGE_ONLY_FIELDS"]

STAND_IN = "stand-in"  # the teacher kind that is a deterministic summariser, not an LLM


class CoTTeacherConfig(BaseModel):
    """Who writes the distilled CoTs: the STAND-IN summariser (default on a CPU), an HF causal LM, or a server."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["stand-in", "hf", "openai"] = Field(
        STAND_IN, description="'stand-in': a deterministic summary of the history (liked/disliked titles, favourite "
                              "categories), NOT an LLM; 'hf': a causal LM; 'openai': an OpenAI-compatible server")
    model: str | None = Field(None, description="hf: HF id / folder / .gguf / 'smollm2'; openai: served model name")
    base_url: str | None = Field(None, description="openai: server URL, e.g. http://127.0.0.1:8000")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the API key")
    max_new_tokens: int = Field(256, ge=1, description="tokens per CoT (the prompt asks for <= 200 words)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")


class CoTDecodingConfig(BaseModel):
    """How G writes CoTs: sampled for preference data (temperature 1.0), greedy for the rest."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(128, ge=1, description="tokens per CoT (TrackRec: 512)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of step (a)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")


class TrackRecConfig(BaseModel):
    """Everything the LLM side of one TrackRec run depends on (defaults: a 2-core CPU budget)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("tiny", description="G's base model: HF id, folder, .gguf, 'smollm2' or 'tiny'")
    verifier_model: str | None = Field(None, description="V's base model (null = the same as `model`)")
    teacher: CoTTeacherConfig = Field(default_factory=CoTTeacherConfig, description="who writes the distilled CoTs")
    iterations: int = Field(3, ge=1, description="alternating iterations N (TrackRec: 3)")
    n_samples: int = Field(10, ge=2, description="CoTs sampled per train impression in step (a) (TrackRec: 10)")
    train_rows: int | None = Field(256, ge=1, description="seeded subsample of train impressions (null = all)")
    test_rows: int | None = Field(256, ge=1, description="seeded subsample of test impressions (null = all)")
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(r=8, alpha=16, dropout=0.05),
                               description="LoRA adapter of G and (fresh every iteration) of V")
    distill: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=1.0, learning_rate=2e-4, batch_size=4,
                                                                     max_length=1024),
                                 description="G's SFT on the teacher's CoTs (TrackRec: 1 epoch)")
    sdpo: SDPOConfig = Field(default_factory=lambda: SDPOConfig(learning_rate=5e-5),
                               description="G's S-DPO update (β 0.1, 2 negatives; TrackRec lr 1e-6 is full FT)")
    rec_tuning: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=3.0, learning_rate=2e-4,
                                                                        batch_size=8, max_length=1024),
                                    description="V's Rec-tuning SFT on Yes/No (TrackRec: 3 epochs)")
    decoding: CoTDecodingConfig = Field(default_factory=CoTDecodingConfig, description="G's CoT decoding")
    backend: GenerationBackend = Field(default_factory=GenerationBackend,
                                       description="engine of G's greedy CoTs (step e, train and test impressions): "
                                                   "transformers | vllm | openai | auto (recalign.llm.backends); the "
                                                   "sampled CoTs of step (a), S-DPO and V's scores always use "
                                                   "transformers")
    verifier_batch_size: int = Field(8, ge=1, description="V prompts per forward pass")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'")
    seed: int = Field(0, description="seed of the row samples, CoT sampling, negatives and training")


STAGE_ONLY_FIELDS = frozenset({"history_len", "threshold", "split", "noun"})  # what TrackRecConfig does not have


class TrackRecStageConfig(TrackRecConfig):
    """Params of a "trackrec" stage: the loop's settings plus how impressions are built from the dataset."""

    history_len: int = Field(10, ge=1, description="items rated before the impression in its history")
    threshold: float = Field(4.0, description="label = rating >= threshold")
    split: list[float] = Field(default_factory=lambda: [0.8, 0.1, 0.1],
                               description="train/valid/test user fractions (seeded by `seed`)")
    noun: str = Field("movie", description="what the items are called in the prompts")

    def trackrec_config(self) -> TrackRecConfig:
        """The loop's settings: these params without the impression fields (`STAGE_ONLY_FIELDS`)."""
        return TrackRecConfig(**self.model_dump(exclude=set(STAGE_ONLY_FIELDS)))
