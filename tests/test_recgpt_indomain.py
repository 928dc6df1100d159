"""RecGPT's in-domain protocol on the synthetic toy domain: trained on its training part, early-stopped on the
validation part, it beats Popularity on the recipe's test users; batching and the sparse loss helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import use_hashing_text_encoder

import recalign.methods.recgpt.algorithm as recgpt
from recalign.methods.recgpt.decoder import DecoderConfig, RecGPTDecoder, pad_histories
from recalign.methods.recgpt.training import batch_order
from recalign.recipes import recipe_from_dict
from recalign.runs import run_recipe


@pytest.fixture(autouse=True)
def fake_text_encoder(monkeypatch, tmp_path):
    use_hashing_text_encoder(monkeypatch, tmp_path / "cache")


def indomain_recipe(seed: int = 0) -> dict:
    params = {"protocol": "in_domain", "tokenizer": {"kind": "rq_kmeans", "rq_kmeans": {"levels": 2,
                                                                                      "codebook_size": 8}},
              "decoder": {"n_layers": 1, "dim": 32, "n_heads": 2, "max_items": 10, "dropout": 0.1},
              "in_domain": {"max_epochs": 30, "patience": 6, "batch_size": 16, "lr": 5e-3, "valid_users": None},
              "beam": {"widths": [20, 40], "extensions": 8, "mode": "both"}, "history": ["excluded"]}
    return recipe_from_dict({
        "name": "recgpt-indomain-test", "seed": seed,
        "data": {"source": "synthetic", "options": {"n_users": 150, "n_items": 40, "min_length": 6,
                                                    "max_length": 12, "seed": 3}},
        "eval": {"ks": [5, 10]},
        "stages": [{"name": "popularity", "kind": "teacher", "params": {"model": "popularity"}},
                   {"name": "recgpt", "kind": "recgpt", "params": params}]})


def test_in_domain_training_beats_popularity_on_the_toy_domain(tmp_path):
    torch.set_num_threads(1)
    summary = run_recipe(indomain_recipe(), tmp_path / "run", progress=False)
    pop, rg = summary["stages"]["popularity"], summary["stages"]["recgpt"]
    assert rg["variant"] == "in-domain" and rg["users_hash"] == pop["users_hash"]
    assert rg["ndcg@10"] > pop["ndcg@10"] + 0.02 and rg["exact.ndcg@10"] > pop["ndcg@10"] + 0.02
    assert 1 <= rg["best_epoch"] <= rg["epochs"] <= 30
    stage = tmp_path / "run" / "stages" / "recgpt"
    curve = [json.loads(line) for line in (stage / "curves.jsonl").read_text().splitlines()]
    assert len(curve) == rg["epochs"] and all(r["valid_value"] is not None for r in curve)
    assert max(r["valid_value"] for r in curve) == pytest.approx(rg["valid_ndcg@10"])
    again = run_recipe(indomain_recipe(), tmp_path / "run", progress=False)  # resumes: same numbers
    assert again["stages"]["recgpt"]["ndcg@10"] == rg["ndcg@10"]


def test_zero_shot_fingerprint_ignores_the_in_domain_keys():
    base = recgpt.RecGPTConfig()
    assert "protocol" not in base.fingerprint_dump() and "in_domain" not in base.fingerprint_dump()
    assert recgpt.RecGPTConfig(protocol="in_domain").fingerprint_dump()["protocol"] == "in_domain"


def test_length_grouped_batches_cover_every_row_once_and_are_seeded():
    lengths = [int(x) for x in np.random.default_rng(0).integers(2, 20, size=103)]
    make = lambda: batch_order(lengths, 10, torch.Generator().manual_seed(4), grouped=True)
    batches = make()
    assert sorted(i for b in batches for i in b) == list(range(103)) and batches == make()
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert np.mean(spread) <= 2
    plain = batch_order(lengths, 10, torch.Generator().manual_seed(4))
    assert [i for b in plain for i in b] == torch.randperm(103, generator=torch.Generator().manual_seed(4)).tolist()


def test_sparse_loss_equals_the_padded_loss():
    torch.manual_seed(0)
    sizes = (7, 5, 3)
    decoder = RecGPTDecoder(sizes, 8, DecoderConfig(n_layers=1, dim=16, n_heads=2, dropout=0.0, max_items=6)).eval()
    codes = torch.stack([torch.randint(0, s, (12,)) for s in sizes], 1)
    vectors = torch.randn(12, 8)
    histories = pad_histories([[0, 3, 5], [1, 2, 3, 4, 5, 6], [7, 8]], 6, side="right")
    dense, sparse = decoder.loss(histories, codes, vectors), decoder.sparse_loss(histories, codes, vectors)
    assert float(sparse.detach()) == pytest.approx(float(dense.detach()), rel=1e-5)


def test_fine_tuning_to_convergence_keeps_the_pretrained_start_when_validation_only_falls(tmp_path):
    """`indomain_decoder(start=...)` checks the pre-trained start as epoch 0: when every later check is worse, the
    start's weights come back unchanged (without the epoch-0 check the first trained epoch would be kept)."""
    from recalign.checkpoints import IterationStore
    from recalign.methods.recgpt.codes import ItemCodes

    torch.manual_seed(0)
    sizes = (6, 4)
    codes = ItemCodes(torch.stack([torch.arange(20) % 6, torch.arange(20) // 6], 1), sizes)
    catalog = recgpt.CodeCatalog("toy", torch.randn(20, 8), codes, np.arange(20))
    params = recgpt.RecGPTConfig(decoder={"n_layers": 1, "dim": 16, "n_heads": 2, "max_items": 6},
                                 in_domain={"max_epochs": 3, "patience": 5, "batch_size": 4, "lr": 1e-2})
    start = recgpt.new_decoder(catalog, params.decoder, seed=1)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    falling = iter([0.5, 0.4, 0.3, 0.2])  # epoch 0 (the start), then epochs 1-3
    sequences = [np.array([i % 20, (i + 1) % 20, (i + 2) % 20]) for i in range(16)]
    tuned, record = recgpt.indomain_decoder(catalog, sequences, params, 0, IterationStore(tmp_path, "k"),
                                            lambda decoder: {"ndcg@10": next(falling)}, start=start,
                                            loop="converge")
    assert record["best_epoch"] == 0 and record["epochs"] == 3 and record["loop"] == "converge"
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in before.items())
    rising = iter([0.1, 0.2, 0.3, 0.4])
    tuned, record = recgpt.indomain_decoder(catalog, sequences, params, 0, IterationStore(tmp_path / "b", "k"),
                                            lambda decoder: {"ndcg@10": next(rising)}, start=start)
    assert record["best_epoch"] == 3
    assert not all(torch.equal(tuned.state_dict()[k], v) for k, v in before.items())
