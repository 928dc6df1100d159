"""Shared fixtures: a hand-written tiny dataset and a small seeded synthetic one (no files needed)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.data.dataset import Dataset, build_dataset

# Three users, five items, two categories. Sequences by time (dense ids in brackets):
#   alice: i1[0] i2[1] i3[2] i4[3]   bob: i2[1] i3[2] i5[4]   carol: i1[0] i3[2] i4[3] i5[4]
TINY_ITEMS = pd.DataFrame({
    "item": ["i1", "i2", "i3", "i4", "i5"],
    "title": ["Red Ocean 1", "Silent Garden 2", "Golden Empire 3", "Hidden River 4", "Broken Mirror 5"],
    "categories": [["Mystery"], ["Mystery"], ["Romance"], ["Romance", "Mystery"], ["Romance"]],
    "text": ["Red Ocean 1. A mystery.", "Silent Garden 2. A mystery.", "Golden Empire 3. A romance.",
             "Hidden River 4. A romance mystery.", "Broken Mirror 5. A romance."],
})
TINY_INTERACTIONS = pd.DataFrame(
    [("alice", "i1", 10, 5.0), ("bob", "i2", 11, 4.0), ("carol", "i1", 12, 3.0), ("alice", "i2", 20, 4.0),
     ("bob", "i3", 21, 5.0), ("carol", "i3", 22, 4.0), ("alice", "i3", 30, 2.0), ("bob", "i5", 31, 5.0),
     ("carol", "i4", 32, 5.0), ("alice", "i4", 40, 4.0), ("carol", "i5", 42, 1.0)],
    columns=["user", "item", "timestamp", "rating"])


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests run torch on one thread: tiny models are faster so, and much faster on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def tiny_dataset() -> Dataset:
    """3 users x 5 items, 11 interactions, titles and categories (see the comment above for the sequences)."""
    return build_dataset(TINY_INTERACTIONS, items=TINY_ITEMS, name="tiny", source="test")


@pytest.fixture()
def synthetic_dataset() -> Dataset:
    """A small seeded synthetic dataset (200 users, 60 items, sequences of 10-20) with learnable structure."""
    from recalign.data.sources.synthetic import (
        SyntheticSourceConfig,
        generate_synthetic,
    )

    return generate_synthetic(SyntheticSourceConfig(n_users=200, n_items=60, n_categories=4, min_length=10,
                                               max_length=20, seed=0))


# ---- a toy policy for the RL tests (tests/test_ppo.py, tests/test_grpo.py) ----------------------------------------

def toy_policy(seed: int = 0):
    """(tiny random Llama, 22-word tokenizer): prompts 'p0 :' .. 'p7 :', answers over w0..w9.

    A small vocabulary makes the toy reward reachable by sampling; the final norm is scaled up (×4) because a
    random tiny Llama's tied embeddings (std 0.02) cap every logit near ±1, so no adapter could make any token
    likely (the best p(w3) would be about 0.15).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from recalign.llm.models import tiny_model

    words = ["<pad>", "<eos>", "<bos>", ":"] + [f"w{i}" for i in range(10)] + [f"p{i}" for i in range(8)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>")
    model, tokenizer = tiny_model(seed=seed, tokenizer=tokenizer)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    return model, tokenizer


def hashing_encoder(texts, width: int = 16) -> np.ndarray:
    """A deterministic `width`-d vector per text (seeded by its hash): stands in for a sentence encoder."""
    out = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=width)
           for t in texts]
    return np.asarray(out, dtype=np.float32).reshape(len(texts), width)


def use_hashing_text_encoder(monkeypatch, cache_dir, width: int = 16) -> None:
    """Make RecGPT embed item texts with `hashing_encoder` (cached under `cache_dir`) instead of MiniLM."""
    import recalign.methods.recgpt.algorithm as recgpt

    real = recgpt.embed_texts
    monkeypatch.setattr(recgpt, "embed_texts", lambda texts, model, **kw: real(
        texts, model, **{**kw, "encoder": lambda t: hashing_encoder(t, width), "cache_dir": cache_dir}))
