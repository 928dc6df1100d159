"""The toy-lm stage's settings: size of the from-scratch model and its pre-training schedule."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ToyLMConfig(BaseModel):
    """Params of a "toy-lm" stage. The defaults learn the synthetic world's successor structure in ~10-20 s on
    one CPU thread (next-title accuracy far above Popularity); raise `epochs` for larger toy worlds."""

    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(64, ge=8, description="hidden size of the Llama")
    layers: int = Field(2, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads (key/value heads: half of them)")
    epochs: int = Field(3, ge=1, description="passes over the pre-training texts")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate (linear decay to zero)")
    batch_size: int = Field(4, ge=1, description="texts per step (small batches: more steps, faster learning)")
    window: int = Field(12, ge=2, description="titles per pre-training text (a window of a user's sequence)")
    stride: int = Field(6, ge=1, description="a new window every `stride` items of a sequence")
    item_texts: bool = Field(True, description="also pre-train on each item's text (e.g. its category)")
    seed: int | None = Field(None, description="init and shuffle seed (default: the recipe seed)")
