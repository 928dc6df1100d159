"""The settings of RecGPT's recipe stage (`recgpt`): item tokenizer, decoder, its two trainings and the beam search.

Defaults are a budget a 2-core CPU finishes; the original's values are named in each description (see
docs/systems/recgpt.md, "Defaults and where they live").
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recalign.config import StrictConfig
from recalign.methods.recgpt.text import DEFAULT_TEXT_MODEL

__all__ = ["RecGPTConfig", "RecGPTTokenizerConfig", "RecGPTRQKMeansConfig", "RecGPTDecoderConfig",
           "RecGPTTrainingConfig", "RecGPTBeamConfig"]


class RecGPTRQKMeansConfig(StrictConfig):
    """Residual k-means item codes (`tokenizer.kind: rq_kmeans`): `levels` positions of `codebook_size` codes."""

    levels: int = Field(3, ge=1, description="residual k-means levels (code positions before disambiguation)")
    codebook_size: int = Field(256, ge=1, description="centroids per level")
    iterations: int = Field(20, ge=1, description="Lloyd iterations per level")
    init: Literal["kmeans++", "random"] = Field("kmeans++", description="seeded centroid initialisation")
    balanced: bool = Field(False, description="capacity-constrained assignment: at most ceil(N / codebook_size) "
                                              "items per centroid")


class RecGPTTokenizerConfig(StrictConfig):
    """Item tokenizer: FSQ (levels [8, 8, 8, 6, 5] over 4 chunks, as the original) or RQ-KMeans."""

    kind: Literal["fsq", "rq_kmeans"] = Field("fsq", description="fsq (the original) or rq_kmeans (residual k-means "
                                                                 "over the text embeddings, `rq_kmeans` block)")
    rq_kmeans: RecGPTRQKMeansConfig = Field(default_factory=RecGPTRQKMeansConfig,
                                            description="RQ-KMeans settings (read only when kind is rq_kmeans)")
    levels: list[int] = Field([8, 8, 8, 6, 5], description="FSQ levels per latent digit (product = codes per chunk)")
    n_chunks: int = Field(4, ge=1, description="code positions from FSQ (the embedding width must divide by it)")
    hidden: int = Field(512, ge=1, description="reconstruction decoder width")
    epochs: int = Field(30, ge=1, description="L1 reconstruction epochs")
    batch_size: int = Field(256, ge=1, description="item embeddings per tokenizer optimiser step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the tokenizer")


class RecGPTDecoderConfig(StrictConfig):
    """GPT-2 decoder over codes (the original: 3 layers, 768 wide; CPU default much smaller)."""

    n_layers: int = Field(2, ge=1, description="transformer blocks (the original: 3)")
    dim: int = Field(64, ge=8, description="hidden width (the original: 768)")
    n_heads: int = Field(4, ge=1, description="attention heads (must divide `dim`)")
    dropout: float = Field(0.1, ge=0, lt=1, description="residual, embedding and attention dropout")
    max_items: int = Field(20, ge=2, description="items of a history the decoder reads (its last ones)")
    text_mode: Literal["whole", "chunk"] = Field("whole", description="text vector added whole, or chunk j to "
                                                                      "token j (the original; needs 5 | width)")


class RecGPTTrainingConfig(StrictConfig):
    """Decoder training: AdamW over shuffled user sequences; one checkpoint per epoch."""

    epochs: int = Field(2, ge=0, description="passes over the sequences (0 = skip this step)")
    batch_size: int = Field(32, ge=1, description="user sequences per optimiser step")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (the original: 1e-4, no schedule)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    users: int | None = Field(None, ge=1, description="seeded subset of users per dataset (null = all); "
                                                      "pre-training catalogs keep only these users' items")


class RecGPTBeamConfig(StrictConfig):
    """Trie-constrained beam search (the original: 10 first codes, 5 extensions, 20 beams, temperature 0.1)."""

    widths: list[int] = Field([10, 20], description="beams kept after each code position (the last repeats)")
    extensions: int = Field(5, ge=1, description="best allowed codes tried per beam at each later position")
    temperature: float = Field(0.1, gt=0, description="softmax temperature of the decoder's code log-probs")
    batch_size: int = Field(64, ge=1, description="users per decoder call")
    mode: Literal["beam", "exact", "both"] = Field(
        "beam", description="lists by the beam, by exact full-catalog scoring (every item's summed code log-prob, "
                            "same temperature), or both (the exact lists' metrics reported as `exact.*`)")


class RecGPTConfig(StrictConfig):
    """Stage `recgpt`: pre-train on the recipe's `pretrain` datasets, zero-shot (and fine-tuned) on its data."""

    text_model: str = Field(DEFAULT_TEXT_MODEL, description="sentence-transformers model (all-mpnet-base-v2: "
                                                            "the original's)")
    text_max_tokens: int | None = Field(128, ge=1, description="tokens of an item text the encoder reads "
                                                               "(null: the model's limit)")
    tokenizer: RecGPTTokenizerConfig = Field(default_factory=RecGPTTokenizerConfig,
                                             description="FSQ or RQ-KMeans item tokenizer (fitted on the "
                                                         "pre-training items)")
    decoder: RecGPTDecoderConfig = Field(default_factory=RecGPTDecoderConfig, description="GPT decoder size")
    pretrain: RecGPTTrainingConfig = Field(default_factory=RecGPTTrainingConfig,
                                           description="pre-training on every `datasets.pretrain` domain")
    finetune: RecGPTTrainingConfig = Field(default_factory=lambda: RecGPTTrainingConfig(epochs=0),
                                           description="fine-tuning on the target's train part (epochs 0 = none)")
    beam: RecGPTBeamConfig = Field(default_factory=RecGPTBeamConfig, description="trie-constrained beam search")
    history: list[Literal["excluded", "allowed"]] = Field(
        ["excluded", "allowed"], description="beam history filtering modes to score; the first is the headline")
    seed: int | None = Field(None, description="tokenizer, decoder and subset seed (default: the recipe seed)")

    def fingerprint_dump(self) -> dict:
        """The settings the work folder's checkpoints depend on, as JSON: all but `beam.mode` (exact lists are
        checkpoints of their own) and, while the tokenizer is FSQ, `tokenizer.kind` and `tokenizer.rq_kmeans` (so
        folders written before these keys existed still resume)."""
        dump = self.model_dump(mode="json")
        del dump["beam"]["mode"]
        if self.tokenizer.kind == "fsq":
            del dump["tokenizer"]["kind"], dump["tokenizer"]["rq_kmeans"]
        return dump
