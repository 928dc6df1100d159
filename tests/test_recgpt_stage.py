"""The recgpt stage end to end on synthetic data (a hashing text encoder instead of MiniLM), resume, helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import use_hashing_text_encoder

import recalign.methods.recgpt.algorithm as recgpt
from recalign.methods.recgpt.codes import ItemCodes
from recalign.recipes import recipe_from_dict
from recalign.runs import run_recipe


@pytest.fixture(autouse=True)
def fake_text_encoder(monkeypatch, tmp_path):
    use_hashing_text_encoder(monkeypatch, tmp_path / "cache")


def synthetic(seed: int, n_users: int = 24, n_items: int = 30) -> dict:
    return {"source": "synthetic", "options": {"n_users": n_users, "n_items": n_items, "min_length": 4,
                                               "max_length": 8, "seed": seed}}


def recipe(finetune_epochs: int = 0, **recgpt_params) -> dict:
    params = {"tokenizer": {"epochs": 2, "hidden": 16}, "decoder": {"n_layers": 1, "dim": 16, "n_heads": 2,
                                                                      "max_items": 8},
              "pretrain": {"epochs": 2, "batch_size": 8}, "finetune": {"epochs": finetune_epochs, "batch_size": 8},
              "beam": {"widths": [6, 12], "extensions": 3}, **recgpt_params}
    return recipe_from_dict({
        "name": "recgpt-test", "seed": 0, "data": synthetic(9, n_users=16),
        "datasets": {"pretrain": [synthetic(1), synthetic(2, n_items=25)]},
        "eval": {"ks": [1, 3, 5, 10], "users": 10},
        "stages": [{"name": "popularity", "kind": "teacher", "params": {"model": "popularity"}},
                   {"name": "recgpt", "kind": "recgpt", "params": params}]})


def test_recgpt_stage_scores_zero_shot_and_finetuned_on_the_recipe_users(tmp_path):
    summary = run_recipe(recipe(finetune_epochs=1), tmp_path / "run", progress=False)
    pop, rg = summary["stages"]["popularity"], summary["stages"]["recgpt"]
    assert rg["users_hash"] == pop["users_hash"] and rg["n_users"] == 10
    for key in ("hr@1", "hr@3", "hr@5", "hr@10", "ndcg@10", "zeroshot_hr@10", "history_allowed_hr@10",
                "zeroshot_history_allowed_ndcg@5"):
        assert 0.0 <= rg[key] <= 1.0, key
    assert rg["ndcg@10"] <= rg["hr@10"] and rg["hr@1"] <= rg["hr@10"]
    # the table row is the decoder the recipe trained last (fine-tuned), the zero-shot one beside it
    assert rg["variant"] == "fine-tuned" and rg["history"] == "excluded"
    codes = ItemCodes.load(tmp_path / "run" / "stages" / "recgpt" / "codes.safetensors")
    assert codes.n_items == 30 and codes.n_positions == 5 and codes.is_unique()
    assert rg["collision_rate"] == pytest.approx(codes.collision_rate)
    results = json.loads((tmp_path / "run" / "stages" / "recgpt" / "results.json").read_text())
    assert set(results["zero_shot"]) == {"excluded", "allowed"}
    for mode, prefix in (("excluded", ""), ("allowed", "history_allowed_")):
        assert rg[prefix + "ndcg@10"] == pytest.approx(results["finetuned"][mode]["ndcg@10"])
        assert rg["zeroshot_" + prefix + "ndcg@10"] == pytest.approx(results["zero_shot"][mode]["ndcg@10"])


def test_recgpt_stage_resumes_after_a_kill_without_retraining(tmp_path, monkeypatch):
    import recalign.methods.recgpt.training as training

    calls = []
    real_train = training.train_decoder
    monkeypatch.setattr(training, "train_decoder", lambda *a, **kw: calls.append(1) or real_train(*a, **kw))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after pre-training, before the zero-shot evaluation

    real_beam = recgpt.beam_recommender
    monkeypatch.setattr(recgpt, "beam_recommender", killed)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe(), tmp_path / "run", progress=False)
    assert len(calls) == 2  # two pre-training epochs, each a checkpoint
    monkeypatch.setattr(recgpt, "beam_recommender", real_beam)
    resumed = run_recipe(recipe(), tmp_path / "run", progress=False)["stages"]["recgpt"]
    assert len(calls) == 2  # nothing retrained
    fresh = run_recipe(recipe(), tmp_path / "fresh", progress=False)["stages"]["recgpt"]
    for key in ("hr@10", "ndcg@10", "history_allowed_hr@10", "collision_rate"):
        assert resumed[key] == pytest.approx(fresh[key]), key


def test_joined_shifts_item_ids_by_the_earlier_catalogs():
    sizes = (4, 4, 2)
    a = recgpt.CodeCatalog("a", torch.zeros(3, 4), ItemCodes(torch.tensor([[0, 0, 0], [1, 0, 0], [1, 0, 1]]), sizes),
                       np.arange(3))
    b = recgpt.CodeCatalog("b", torch.ones(2, 4), ItemCodes(torch.tensor([[2, 3, 0], [3, 3, 0]]), sizes), np.arange(2))
    union, seqs = recgpt.joined([a, b], [[np.array([0, 2])], [np.array([1, 0]), np.array([0, 1])]])
    assert [s.tolist() for s in seqs] == [[0, 2], [4, 3], [3, 4]]
    assert union.codes.codes[3].tolist() == [2, 3, 0] and union.vectors.shape == (5, 4)


def test_sample_sequences_keeps_a_seeded_subset_of_users_with_two_items(tiny_dataset):
    all_users = recgpt.sample_sequences(tiny_dataset)
    assert [s.tolist() for s in all_users] == [[0, 1, 2, 3], [1, 2, 4], [0, 2, 3, 4]]
    two = recgpt.sample_sequences(tiny_dataset, users=2, seed=0)
    assert len(two) == 2 and all(any(np.array_equal(s, t) for t in all_users) for s in two)
    assert [s.tolist() for s in two] == [s.tolist() for s in recgpt.sample_sequences(tiny_dataset, users=2, seed=0)]


def test_recgpt_params_reject_unknown_keys():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        recgpt.RecGPTConfig(decoder={"layers": 2})
