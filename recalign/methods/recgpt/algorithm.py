"""RecGPT (HKUDS; reference/systems.md §6): text -> FSQ item codes -> a GPT decoder over codes, zero-shot on new domains.

The algorithm, as `run_stage` executes it:
  1. Embed every item's text (title, categories, description) once with a sentence encoder (MiniLM by default).
  2. Fit the FSQ item tokenizer on the pre-training domains' embeddings; tokenise every catalog, the target's too
     (4 FSQ codes + 1 disambiguating code: every item's code is unique; the collision rate is reported).
  3. Pre-train one decoder on the user sequences of all `pretrain` datasets (next-item codes, all positions at once).
  4. Zero-shot: recommend on the `eval` dataset by trie-constrained beam search over its catalog's codes, never
     having seen its interactions; scored by the recipe's list evaluator, history excluded and allowed.
  5. Optionally fine-tune a copy of the decoder on the target's training part and score it the same way.

Every step is a checkpoint in a work folder outside the stage folder (`IterationStore`), so a killed run resumes:
the tokenizer and codes, each pre-training epoch, each fine-tuning epoch and each evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from recalign.checkpoints import IterationStore
from recalign.config import StrictConfig
from recalign.data.dataset import Dataset
from recalign.methods.recgpt.codes import ItemCodes
from recalign.methods.recgpt.fsq import FSQConfig, ItemTokenizer
from recalign.methods.recgpt.text import DEFAULT_TEXT_MODEL, embed_texts, item_texts

__all__ = ["RecGPTConfig", "CodeCatalog", "RECGPT_STAGE", "build_catalogs", "pretrain_decoder", "finetune_decoder",
           "beam_recommender", "sample_sequences", "run_stage"]


# ---- settings --------------------------------------------------------------------------------------------



class RecGPTTokenizerConfig(StrictConfig):
    """FSQ item tokenizer (levels [8, 8, 8, 6, 5] over 4 chunks, as the original)."""

    levels: list[int] = Field([8, 8, 8, 6, 5], description="FSQ levels per latent digit (product = codes per chunk)")
    n_chunks: int = Field(4, ge=1, description="code positions from FSQ (the embedding width must divide by it)")
    hidden: int = Field(512, ge=1, description="reconstruction decoder width")
    epochs: int = Field(30, ge=1, description="L1 reconstruction epochs")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)


class RecGPTDecoderConfig(StrictConfig):
    """GPT-2 decoder over codes (the original: 3 layers, 768 wide; CPU default much smaller)."""

    n_layers: int = Field(2, ge=1)
    dim: int = Field(64, ge=8)
    n_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    max_items: int = Field(20, ge=2, description="items of a history the decoder reads (its last ones)")
    text_mode: Literal["whole", "chunk"] = Field("whole", description="text vector added whole, or chunk j to "
                                                                      "token j (the original; needs 5 | width)")


class RecGPTTrainingConfig(StrictConfig):
    """Decoder training: AdamW over shuffled user sequences; one checkpoint per epoch."""

    epochs: int = Field(2, ge=0, description="passes over the sequences (0 = skip this step)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    users: int | None = Field(None, ge=1, description="seeded subset of users per dataset (null = all); "
                                                      "pre-training catalogs keep only these users' items")


class RecGPTBeamConfig(StrictConfig):
    """Trie-constrained beam search (the original: 10 first codes, 5 extensions, 20 beams, temperature 0.1)."""

    widths: list[int] = Field([10, 20], description="beams kept after each code position (the last repeats)")
    extensions: int = Field(5, ge=1, description="best allowed codes tried per beam at each later position")
    temperature: float = Field(0.1, gt=0)
    batch_size: int = Field(64, ge=1, description="users per decoder call")


class RecGPTConfig(StrictConfig):
    """Stage `recgpt`: pre-train on the recipe's `pretrain` datasets, zero-shot (and fine-tuned) on its data."""

    text_model: str = Field(DEFAULT_TEXT_MODEL, description="sentence-transformers model (all-mpnet-base-v2: "
                                                            "the original's)")
    text_max_tokens: int | None = Field(128, ge=1, description="tokens of an item text the encoder reads "
                                                               "(null: the model's limit)")
    tokenizer: RecGPTTokenizerConfig = Field(default_factory=RecGPTTokenizerConfig)
    decoder: RecGPTDecoderConfig = Field(default_factory=RecGPTDecoderConfig)
    pretrain: RecGPTTrainingConfig = Field(default_factory=RecGPTTrainingConfig)
    finetune: RecGPTTrainingConfig = Field(default_factory=lambda: RecGPTTrainingConfig(epochs=0))
    beam: RecGPTBeamConfig = Field(default_factory=RecGPTBeamConfig)
    history: list[Literal["excluded", "allowed"]] = Field(
        ["excluded", "allowed"], description="beam history filtering modes to score; the first is the headline")
    seed: int | None = Field(None, description="tokenizer, decoder and subset seed (default: the recipe seed)")


# ---- step 1-2: item text -> embeddings -> codes ----------------------------------------------------------

@dataclass
class CodeCatalog:
    """One domain as the decoder sees it: item text vectors [n, d] and unique item codes."""

    name: str
    vectors: torch.Tensor
    codes: ItemCodes
    items: np.ndarray  # dataset item ids of the catalog rows (all items, or the kept subset)


def sample_sequences(dataset: Dataset, interactions=None, users: int | None = None, seed: int = 0
                     ) -> list[np.ndarray]:
    """Time-ordered item sequences of every user (or a seeded subset of `users` of them) with >= 2 items."""
    sequences = dataset.sequences(interactions)
    eligible = np.flatnonzero(sequences.lengths() >= 2)
    if users is not None and users < len(eligible):
        eligible = np.sort(np.random.default_rng(seed).choice(eligible, size=users, replace=False))
    return [sequences[int(u)] for u in eligible]


def embed_items(dataset: Dataset, items: np.ndarray, params: "RecGPTConfig", progress: bool = False,
                encoder: Callable | None = None) -> torch.Tensor:
    """float32 text vectors [len(items), d] of the given item ids (cached by model and text)."""
    texts = item_texts(dataset.items.iloc[items])
    return torch.from_numpy(embed_texts(texts, params.text_model, encoder=encoder, progress=progress,
                                        max_tokens=params.text_max_tokens))


def build_catalogs(domains: dict[str, tuple[Dataset, np.ndarray]], fit_on: Sequence[str], params: RecGPTConfig,
                   seed: int, *, progress: bool = False, encoder: Callable | None = None
                   ) -> tuple[ItemTokenizer, dict[str, CodeCatalog]]:
    """Embed every domain's items, fit the tokenizer on the `fit_on` domains, tokenise them all.

    Every catalog's codes share one set of sizes (the disambiguating position as wide as the widest group), so
    one decoder reads them all.
    """
    vectors = {name: embed_items(ds, items, params, progress, encoder)
               for name, (ds, items) in domains.items()}
    t = params.tokenizer
    settings = FSQConfig(levels=tuple(t.levels), n_chunks=t.n_chunks, hidden=t.hidden, epochs=t.epochs,
                           batch_size=t.batch_size, lr=t.lr, seed=seed)
    tokenizer = ItemTokenizer(settings).fit(torch.cat([vectors[name] for name in fit_on]))
    codes = {name: tokenizer.encode(v) for name, v in vectors.items()}
    sizes = tuple(max(c.sizes[p] for c in codes.values()) for p in range(t.n_chunks + 1))
    catalogs = {name: CodeCatalog(name, vectors[name], ItemCodes(c.codes, sizes, c.collision_rate), domains[name][1])
                for name, c in codes.items()}
    return tokenizer, catalogs


# ---- step 3-5: the decoder ---------------------------------------------------------------------------------

def new_decoder(catalog: CodeCatalog, params: RecGPTDecoderConfig, seed: int):
    """A freshly initialised decoder sized for the catalog's codes and text width (seeded)."""
    from recalign.methods.recgpt.decoder import DecoderConfig, RecGPTDecoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RecGPTDecoder(catalog.codes.sizes, catalog.vectors.shape[1], DecoderConfig(**params.model_dump()))


def joined(catalogs: Sequence[CodeCatalog], sequences: Sequence[Sequence[np.ndarray]]
           ) -> tuple[CodeCatalog, list[np.ndarray]]:
    """Several domains as one catalog (rows stacked) and their sequences with item ids shifted to match."""
    offsets = np.cumsum([0] + [len(c.items) for c in catalogs[:-1]])
    codes = ItemCodes(torch.cat([c.codes.codes for c in catalogs]), catalogs[0].codes.sizes)
    union = CodeCatalog("+".join(c.name for c in catalogs), torch.cat([c.vectors for c in catalogs]), codes,
                    np.concatenate([c.items for c in catalogs]))
    return union, [s + off for seqs, off in zip(sequences, offsets) for s in seqs]


def _train_epochs(decoder, catalog: CodeCatalog, sequences: list[np.ndarray], training: RecGPTTrainingConfig, seed: int,
                  store: IterationStore, loop: str, progress: bool, log: Callable[[str], None]):
    """Train epoch by epoch, each a checkpoint; finished epochs are loaded instead of retrained."""
    from safetensors.torch import load_file, save_file

    from recalign.methods.recgpt.training import DecoderTraining, train_decoder

    done = store.last_done(loop)
    if done:
        decoder.load_state_dict(load_file(str(store.folder(loop, done) / "decoder.safetensors")))
        log(f"{loop}: resumed after epoch {done}/{training.epochs}")
    for epoch in store.pending(loop, training.epochs, start=done + 1):
        settings = DecoderTraining(epochs=1, batch_size=training.batch_size, lr=training.lr,
                                   weight_decay=training.weight_decay, seed=seed + epoch, progress=progress)
        result = train_decoder(decoder, [s.tolist() for s in sequences], catalog.codes, catalog.vectors, settings)
        state = {k: v.contiguous() for k, v in decoder.state_dict().items()}
        store.commit(store.folder(loop, epoch), {"loop": loop, "iteration": epoch, "loss": result.epoch_losses[-1],
                                                 "seconds": round(result.seconds, 2), "sequences": len(sequences)},
                     lambda tmp: save_file(state, str(tmp / "decoder.safetensors")))
        log(f"{loop}: epoch {epoch}/{training.epochs} loss {result.epoch_losses[-1]:.4f} ({result.seconds:.0f}s)")
    decoder.eval()
    return decoder


def pretrain_decoder(catalogs: Sequence[CodeCatalog], sequences: Sequence[Sequence[np.ndarray]], params: RecGPTConfig,
                     seed: int, store: IterationStore, *, progress: bool = False,
                     log: Callable[[str], None] = lambda m: None):
    """One decoder trained on the sequences of every pre-training domain, shuffled together."""
    union, flat = joined(catalogs, sequences)
    decoder = new_decoder(union, params.decoder, seed)
    return _train_epochs(decoder, union, flat, params.pretrain, seed, store, "pretrain", progress, log)


def finetune_decoder(pretrained, catalog: CodeCatalog, sequences: Sequence[np.ndarray], params: RecGPTConfig,
                     seed: int, store: IterationStore, loop: str = "finetune", *, progress: bool = False,
                     log: Callable[[str], None] = lambda m: None):
    """A copy of the pre-trained decoder trained further on the target domain's training sequences."""
    decoder = new_decoder(catalog, params.decoder, seed)
    decoder.load_state_dict(pretrained.state_dict())
    return _train_epochs(decoder, catalog, list(sequences), params.finetune, seed, store, loop, progress, log)


def beam_recommender(decoder, catalog: CodeCatalog, beam: RecGPTBeamConfig, exclude_history: bool):
    """The decoder as a `ListRecommender` over the catalog: trie-constrained beam search."""
    from recalign.methods.recgpt.beam import BeamLists, CodeBeamConfig

    settings = CodeBeamConfig(widths=tuple(beam.widths), extensions=beam.extensions, temperature=beam.temperature,
                            exclude_history=exclude_history)
    return BeamLists(decoder, catalog.codes, catalog.vectors, settings, batch_size=beam.batch_size)
