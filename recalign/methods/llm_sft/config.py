"""The llm-sft stage's settings: a plain LLM sequential recommender (BIGRec-style)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recalign.llm.answers import Decoding
from recalign.llm.backends import GenerationBackend
from recalign.llm.trainer import LoraConfig
from recalign.llm.generate import GenerationConfig
from recalign.llm.grounding import GroundingConfig
from recalign.llm.tasks import SeqRecTask
from recalign.llm.train import SFTConfig


class LLMSFTConfig(BaseModel):
    """Params of an "llm-sft" stage (defaults: a budget a 2-core CPU finishes; raise them on a GPU)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("smollm2", description="base model: HF id, local folder, .gguf file, 'smollm2' or 'tiny'")
    task: SeqRecTask = Field(default_factory=SeqRecTask, description="prompt task (history length, k titles)")
    train_rows: int | None = Field(512, ge=1, description="seeded subsample of SFT rows (null = all)")
    lora: LoraConfig | None = Field(default_factory=lambda: LoraConfig(r=8, alpha=16, dropout=0.05),
                                      description="LoRA adapter; null = full fine-tuning")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="SFT hyper-parameters")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="decoding settings")
    backend: GenerationBackend = Field(default_factory=GenerationBackend,
                                       description="engine of the evaluation answers: transformers | vllm | openai "
                                                   "| auto (recalign.llm.backends); SFT always uses transformers")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    decodings: list[Decoding] = Field(default_factory=lambda: ["greedy"],
                                      description="decodings evaluated: greedy and/or constrained (catalog trie)")
    grounding: GroundingConfig = Field(default_factory=lambda: GroundingConfig(kind="embedding"),
                                       description="answer title -> K nearest catalog items (BIGRec/SPRec: "
                                                   "embedding L2)")
    eval_part: Literal["valid", "test"] = Field("test", description="split part evaluated (users: the recipe's "
                                                                     "eval.users, cut-offs: eval.ks)")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'")
    dtype: str = Field("auto", description="'auto' (fp32 on CPU, bf16 on GPU), 'float32' or 'bfloat16'")
    save: Literal["adapter", "merged", "none"] = Field("adapter", description="what is saved under <stage>/model")
