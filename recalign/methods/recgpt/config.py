"""The settings of RecGPT's recipe stage (`recgpt`): item tokenizer, decoder, its two trainings and the beam search.

Defaults are a budget a 2-core CPU finishes; the original's values are named in each description (see
docs/systems/recgpt.md, "Defaults and where they live").
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from recalign.config import StrictConfig
from recalign.methods.recgpt.text import DEFAULT_TEXT_MODEL

__all__ = ["RecGPTConfig", "RecGPTTokenizerConfig", "RecGPTRQKMeansConfig", "RecGPTDecoderConfig",
           "RecGPTTrainingConfig", "RecGPTBeamConfig", "RecGPTInDomainConfig"]

logger = logging.getLogger("recalign.methods.recgpt")


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
    """Trie-constrained beam search (the original: 10 first codes, 5 extensions, 20 beams). No temperature: a
    positive one never changes a list (docs/systems/recgpt.md, "Inference"); an old recipe's is ignored."""

    widths: list[int] = Field([10, 20], description="beams kept after each code position (the last repeats)")
    extensions: int = Field(5, ge=1, description="best allowed codes tried per beam at each later position")
    batch_size: int = Field(64, ge=1, description="users per decoder call")
    mode: Literal["beam", "exact", "both"] = Field(
        "beam", description="lists by the beam, by exact full-catalog scoring (every item's summed code log-prob), "
                            "or both (the exact lists' metrics reported as `exact.*`)")

    @model_validator(mode="before")
    @classmethod
    def _ignore_temperature(cls, data: Any) -> Any:
        """Old recipes' `temperature` is dropped with one warning: T > 0 divides every position's logits, so every
        item's summed log-softmax is (1/T) x its summed logits minus a per-user constant, and no ranking moves."""
        if isinstance(data, dict) and "temperature" in data:
            data = {k: v for k, v in data.items() if k != "temperature"}
            logger.warning("recgpt: beam.temperature is ignored: a positive temperature scales every code "
                           "position's logits, so it never changes a ranking or a list")
        return data


class RecGPTInDomainConfig(StrictConfig):
    """In-domain training (`protocol: in_domain`): the decoder trained from scratch on the target's training
    sequences, one AdamW for the whole schedule, validated every epoch on the split's validation part (leave-one-out:
    the second-to-last item), early-stopped with the best state kept (recalign.training.EarlyStopping)."""

    max_epochs: int = Field(30, ge=1, description="most passes over the training sequences")
    patience: int = Field(3, ge=1, description="validation checks without improvement before stopping")
    max_seconds: float | None = Field(None, gt=0, description="stop after the epoch that crosses this many "
                                                               "seconds of training and validation (null = no cap)")
    batch_size: int = Field(64, ge=1, description="user sequences per optimiser step")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate (one optimizer across all epochs)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    users: int | None = Field(None, ge=1, description="seeded subset of training users (null = all)")
    valid_users: int | None = Field(2000, ge=1, description="seeded validation users per check (null = all)")
    valid_metric: str = Field("ndcg@10", description="validation metric that selects the epoch (higher is better)")
    valid_inference: Literal["exact", "beam"] = Field("exact", description="lists scored on validation: exact "
                                                                           "full-catalog scoring or the beam")
    length_grouped: bool = Field(True, description="batches of similar length (sorted, bucketed, buckets "
                                                   "shuffled, seeded): far less padding")
    sparse_logits: bool = Field(True, description="training logits only for real (non-padded) slots, each code "
                                                  "position's head sized to its own values (same loss)")


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
    protocol: Literal["zero_shot", "in_domain"] = Field(
        "zero_shot", description="zero_shot: pre-train on `datasets.pretrain`, score on the target (then optional "
                                 "fine-tuning); in_domain: tokenizer and decoder trained on the target's training "
                                 "part only, early-stopped on its validation part (`in_domain` block)")
    in_domain: RecGPTInDomainConfig = Field(default_factory=RecGPTInDomainConfig,
                                            description="in-domain training (read only when protocol is in_domain)")
    history: list[Literal["excluded", "allowed"]] = Field(
        ["excluded", "allowed"], description="beam history filtering modes to score; the first is the headline")
    seed: int | None = Field(None, description="tokenizer, decoder and subset seed (default: the recipe seed)")

    @model_serializer(mode="wrap")
    def _omit_unused_protocol(self, handler) -> dict:
        """Dumps of zero-shot settings with the default `in_domain` block leave `protocol` and `in_domain` out, so
        they read exactly as before these keys existed (recipe snapshots, work-folder fingerprints)."""
        data = handler(self)
        if self.protocol == "zero_shot" and self.in_domain == RecGPTInDomainConfig():
            data.pop("protocol", None)
            data.pop("in_domain", None)
        return data

    def fingerprint_dump(self) -> dict:
        """The settings the work folder's checkpoints depend on, as JSON: all but `beam.mode` (exact lists are
        checkpoints of their own), while the tokenizer is FSQ, `tokenizer.kind` and `tokenizer.rq_kmeans`, and while
        the protocol is zero_shot, `protocol` and `in_domain` (so folders written before these keys still resume).
        `beam.temperature` (removed: it never changed a list) stays in as its old default 0.1, so folders written
        while it existed still resume."""
        dump = self.model_dump(mode="json")
        del dump["beam"]["mode"]
        dump["beam"]["temperature"] = 0.1
        if self.tokenizer.kind == "fsq":
            del dump["tokenizer"]["kind"], dump["tokenizer"]["rq_kmeans"]
        if self.protocol == "zero_shot":  # folders of zero-shot runs written before these keys still resume
            dump.pop("protocol", None)
            dump.pop("in_domain", None)
        return dump
