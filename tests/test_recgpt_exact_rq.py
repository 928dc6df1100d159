"""RecGPT's exact full-catalog scoring (teacher-forced log-probs, parity with a catalog-wide beam) and the
RQ-KMeans item tokenizer (unique, deterministic codes through the same catalog path)."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch
from conftest import hashing_encoder as shared_hashing_encoder
from conftest import use_hashing_text_encoder

import recalign.methods.recgpt.algorithm as recgpt
from recalign.methods.recgpt.beam import (
    BeamLists,
    CodeBeamConfig,
    CodeTrie,
    beam_search,
    history_mask,
)
from recalign.methods.recgpt.codes import ItemCodes
from recalign.methods.recgpt.config import RecGPTConfig
from recalign.methods.recgpt.decoder import DecoderConfig, RecGPTDecoder, pad_histories
from recalign.methods.recgpt.exact import ExactLists, exact_scores, top_items
from recalign.methods.recgpt.rq_kmeans import (
    RQKMeansConfig,
    RQKMeansTokenizer,
    balanced_assign,
)

pytestmark = pytest.mark.fast


def hashing_encoder(texts):
    """A deterministic 8-d vector per text (seeded by its hash): equal texts get equal vectors."""
    return shared_hashing_encoder(texts, width=8)


def tiny_decoder(sizes, text_dim: int = 8, seed: int = 0) -> RecGPTDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = RecGPTDecoder(sizes, text_dim, DecoderConfig(n_layers=1, dim=16, n_heads=2, dropout=0.0,
                                                               max_items=6))
    return decoder.eval()


def toy_catalog(sizes=(4, 3, 3, 2), n_items: int = 30, seed: int = 0) -> recgpt.CodeCatalog:
    rows = list(itertools.product(*[range(s) for s in sizes]))
    chosen = np.random.default_rng(seed).choice(len(rows), size=n_items, replace=False)
    codes = ItemCodes(torch.tensor([rows[i] for i in sorted(chosen)]), sizes)
    vectors = torch.from_numpy(np.random.default_rng(seed + 1).normal(size=(n_items, 8)).astype(np.float32))
    return recgpt.CodeCatalog("toy", vectors, codes, np.arange(n_items))


# ---- RQ-KMeans ---------------------------------------------------------------------------------------------

TEXTS = [f"item {i % 17}" for i in range(40)] + ["", "", "a title", "a title", ""]  # duplicates and empties


def test_rq_kmeans_gives_every_item_a_unique_code_with_duplicates_and_empty_texts():
    x = hashing_encoder(TEXTS)
    tokenizer = RQKMeansTokenizer(RQKMeansConfig(levels=2, codebook_size=4, iterations=5, seed=0)).fit(x)
    codes = tokenizer.encode(x)
    assert codes.n_items == len(TEXTS) and codes.n_positions == 3 and codes.is_unique()
    assert codes.sizes[:2] == (4, 4) and codes.collision_rate > 0
    for a, b in [(0, 17), (40, 44), (42, 43)]:  # equal texts: equal level codes, told apart by the last position
        assert codes.codes[a, :2].tolist() == codes.codes[b, :2].tolist()
        assert codes.codes[a, 2] != codes.codes[b, 2]
    assert len(tokenizer.history) == 2 and tokenizer.history[1] <= tokenizer.history[0]
    assert torch.equal(tokenizer.level_codes(x), codes.codes[:, :2])  # encoding again gives the fitted codes


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_rq_kmeans_is_deterministic_for_a_seed(init):
    x = hashing_encoder(TEXTS)

    def codes(seed):
        settings = RQKMeansConfig(levels=3, codebook_size=5, iterations=4, init=init, seed=seed)
        return RQKMeansTokenizer(settings).fit(x).encode(x).codes

    first = codes(0)
    assert torch.equal(first, codes(0))
    others = [codes(seed) for seed in (1, 2, 3)]
    assert all(torch.unique(o, dim=0).shape[0] == len(TEXTS) for o in others)
    assert any(not torch.equal(first, o) for o in others)  # another seed may (and here does) differ


def test_rq_kmeans_more_centroids_than_items_and_save_load(tmp_path):
    x = hashing_encoder(["x", "y", "y"])
    tokenizer = RQKMeansTokenizer(RQKMeansConfig(levels=2, codebook_size=8, iterations=3)).fit(x)
    codes = tokenizer.encode(x)
    assert codes.is_unique() and codes.codes[1, :2].tolist() == codes.codes[2, :2].tolist()
    back = RQKMeansTokenizer.load(tokenizer.save(tmp_path / "rq.safetensors"))
    assert torch.equal(back.encode(x).codes, codes.codes) and back.settings == tokenizer.settings


def test_balanced_assignment_respects_capacity_nearest_first():
    # 4 points all nearest to cluster 0; capacity ceil(4 / 2) = 2: the two closest stay, the others move to 1.
    distances = torch.tensor([[0.1, 5.0], [0.2, 4.0], [0.3, 1.0], [0.05, 9.0]])
    assert balanced_assign(distances).tolist() == [0, 1, 1, 0]
    x = hashing_encoder(TEXTS)
    balanced = RQKMeansTokenizer(RQKMeansConfig(levels=2, codebook_size=4, iterations=5, balanced=True)).fit(x)
    codes = balanced.encode(x)
    assert codes.is_unique()
    for level in range(2):
        assert torch.bincount(codes.codes[:, level], minlength=4).max() <= math.ceil(len(TEXTS) / 4)


def test_rq_kmeans_catalogs_plug_into_the_decoder_and_both_inference_modes(tiny_dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("RECALIGN_CACHE", str(tmp_path))
    params = RecGPTConfig(tokenizer={"kind": "rq_kmeans", "rq_kmeans": {"levels": 2, "codebook_size": 2,
                                                                        "iterations": 3}})
    domains = {"pretrain-0": (tiny_dataset, np.arange(5)), "target": (tiny_dataset, np.arange(5))}
    tokenizer, catalogs = recgpt.build_catalogs(domains, ["pretrain-0"], params, seed=0, encoder=hashing_encoder)
    assert isinstance(tokenizer, RQKMeansTokenizer)
    target = catalogs["target"]
    assert target.codes.n_positions == 3 and target.codes.is_unique() and target.codes.sizes[:2] == (2, 2)
    decoder = recgpt.new_decoder(target, params.decoder, seed=0).eval()
    histories = {0: [0, 1], 1: [2]}
    users = np.array([0, 1])
    exact = recgpt.exact_recommender(decoder, target, True, params.beam).recommend(users, histories, 5)
    assert exact.shape == (2, 5) and (exact[0, :3] >= 0).all() and set(exact[0, :3].tolist()).isdisjoint({0, 1})
    assert exact[0, 3:].tolist() == [-1, -1]  # only 3 items are left once the history is excluded
    beam = recgpt.beam_recommender(decoder, target, params.beam, True).recommend(users, histories, 5)
    assert beam.shape == (2, 5) and set(beam[0, :3].tolist()).isdisjoint({0, 1})


def test_defaults_keep_fsq_and_beam_and_the_old_work_folder_fingerprint():
    params = RecGPTConfig()
    assert params.tokenizer.kind == "fsq" and params.beam.mode == "beam"
    old = params.model_dump(mode="json")
    del old["beam"]["mode"], old["tokenizer"]["kind"], old["tokenizer"]["rq_kmeans"]
    old["beam"]["temperature"] = 0.1  # removed (it never changed a list), its old default kept in the fingerprint
    assert params.fingerprint_dump() == old
    assert RecGPTConfig(beam={"mode": "both"}).fingerprint_dump() == old  # exact lists are their own checkpoints
    assert RecGPTConfig(tokenizer={"kind": "rq_kmeans"}).fingerprint_dump() != old
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RecGPTConfig(beam={"mode": "greedy"})


def stage_recipe(**recgpt_params):
    from recalign.recipes import recipe_from_dict

    def synthetic(seed, n_users=16, n_items=30):
        return {"source": "synthetic", "options": {"n_users": n_users, "n_items": n_items, "min_length": 4,
                                                   "max_length": 8, "seed": seed}}

    params = {"decoder": {"n_layers": 1, "dim": 16, "n_heads": 2, "max_items": 8},
              "pretrain": {"epochs": 1, "batch_size": 8}, "beam": {"widths": [6, 12], "extensions": 3},
              **recgpt_params}
    return recipe_from_dict({"name": "recgpt-exact", "seed": 0, "data": synthetic(9),
                             "datasets": {"pretrain": [synthetic(1, n_users=24)]}, "eval": {"ks": [1, 5, 10]},
                             "stages": [{"name": "recgpt", "kind": "recgpt", "params": params}]})


def test_stage_with_rq_kmeans_codes_reports_exact_metrics_beside_the_unchanged_beam_metrics(tmp_path, monkeypatch):
    from recalign.methods.recgpt.stage import exact_differences
    from recalign.runs import run_recipe

    use_hashing_text_encoder(monkeypatch, tmp_path / "cache", width=8)
    tokenizer = {"kind": "rq_kmeans", "rq_kmeans": {"levels": 2, "codebook_size": 4, "iterations": 3}}
    beam_only = run_recipe(stage_recipe(tokenizer=tokenizer), tmp_path / "run", progress=False)["stages"]["recgpt"]
    assert "inference" not in beam_only and not any(k.startswith("exact.") for k in beam_only)
    both = run_recipe(stage_recipe(tokenizer=tokenizer, beam={"widths": [6, 12], "extensions": 3, "mode": "both"}),
                      tmp_path / "run", progress=False)["stages"]["recgpt"]  # same work folder: only exact evals run
    assert both["inference"] == "both" and both["work_dir"] == beam_only["work_dir"]
    for key in ("hr@1", "hr@10", "ndcg@10", "history_allowed_hr@10", "collision_rate"):
        assert both[key] == beam_only[key], key
        assert 0.0 <= both.get(f"exact.{key}", 0.0) <= 1.0
    assert {"exact.hr@10", "exact.ndcg@5", "exact.history_allowed_hr@10"} <= set(both)
    differences = exact_differences(both)
    assert differences["hr@10"] == pytest.approx(both["exact.hr@10"] - both["hr@10"])
    codes = ItemCodes.load(tmp_path / "run" / "stages" / "recgpt" / "codes.safetensors")
    assert codes.n_positions == 3 and codes.sizes[:2] == (4, 4) and codes.is_unique()


# ---- exact scoring -----------------------------------------------------------------------------------------

def test_exact_scores_of_a_hand_table_and_history_exclusion():
    # items: 0 -> (1, 0), 1 -> (0, 1), 2 -> (1, 1)
    codes = torch.tensor([[1, 0], [0, 1], [1, 1]])
    table = torch.log(torch.tensor([[[0.3, 0.7], [0.6, 0.4]], [[0.9, 0.1], [0.2, 0.8]]]))
    scores = exact_scores(table, CodeTrie.build(codes))
    expected = [[math.log(0.7 * 0.6), math.log(0.3 * 0.4), math.log(0.7 * 0.4)],
                [math.log(0.1 * 0.2), math.log(0.9 * 0.8), math.log(0.1 * 0.8)]]
    assert torch.allclose(scores, torch.tensor(expected))
    masked = exact_scores(table, CodeTrie.build(codes), history_mask([[2], [0, 1]], 3))
    assert masked[0, 2] == float("-inf") and masked[1, :2].tolist() == [float("-inf")] * 2
    assert masked[0, :2].tolist() == pytest.approx(expected[0][:2])


def test_exact_scores_equal_teacher_forced_log_probs_of_a_three_item_catalog():
    sizes = (3, 3, 2)
    codes = ItemCodes(torch.tensor([[0, 1, 0], [1, 0, 1], [1, 2, 0]]), sizes)
    vectors = torch.from_numpy(np.random.default_rng(3).normal(size=(3, 8)).astype(np.float32))
    decoder = tiny_decoder(sizes, seed=7)
    histories = [[0, 1], [2], [1, 2, 0]]
    with torch.no_grad():
        # Teacher forcing: append the candidate; the last history item's tokens predict its code positions.
        forced = torch.zeros(len(histories), 3)
        for u, history in enumerate(histories):
            for item in range(3):
                logits = decoder(torch.tensor([history + [item]]), codes, vectors)[0, len(history) - 1]
                log_probs = torch.log_softmax(logits, dim=-1)
                forced[u, item] = sum(log_probs[j, codes.codes[item, j]] for j in range(3))
        tables = decoder.next_item_log_probs(pad_histories(histories, 6), codes, vectors)
    scores = exact_scores(tables, CodeTrie.build(codes))
    assert torch.allclose(scores, forced, atol=1e-5)
    catalog = recgpt.CodeCatalog("three", vectors, codes, np.arange(3))
    lists = recgpt.exact_recommender(decoder, catalog, False, recgpt.RecGPTBeamConfig()).recommend(
        np.arange(3), dict(enumerate(histories)), 3)
    assert lists.tolist() == torch.argsort(forced, dim=1, descending=True).tolist()


@pytest.mark.parametrize("exclude_history", [True, False])
def test_exact_lists_equal_a_beam_wide_enough_for_the_whole_catalog(exclude_history):
    catalog = toy_catalog()
    decoder = tiny_decoder(catalog.codes.sizes, seed=1)
    rng = np.random.default_rng(5)
    histories = {u: rng.choice(30, size=int(rng.integers(1, 6)), replace=False).tolist() for u in range(12)}
    histories[12] = []  # no history: an empty list from both
    users = np.arange(13)
    wide = recgpt.RecGPTBeamConfig(widths=[30], extensions=max(catalog.codes.sizes), batch_size=5)
    beam = recgpt.beam_recommender(decoder, catalog, wide, exclude_history)
    exact = recgpt.exact_recommender(decoder, catalog, exclude_history, wide)
    assert isinstance(beam, BeamLists) and isinstance(exact, ExactLists)
    for k in (5, 10, 30):
        beam_lists, exact_lists = beam.recommend(users, histories, k), exact.recommend(users, histories, k)
        assert torch.equal(beam_lists, exact_lists), k
    assert (exact_lists[12] == -1).all()
    if exclude_history:
        for u in range(12):
            assert set(exact_lists[u].tolist()).isdisjoint(histories[u])
    # a narrow beam may miss items the exact ranking puts first; exact lists never depend on the widths
    narrow = recgpt.RecGPTBeamConfig(widths=[1, 2], extensions=1, batch_size=5)
    assert torch.equal(recgpt.exact_recommender(decoder, catalog, exclude_history, narrow).recommend(
        users, histories, 10), exact.recommend(users, histories, 10))


def test_exact_recommender_defaults_to_the_beam_settings():
    catalog = toy_catalog(n_items=12)
    decoder = tiny_decoder(catalog.codes.sizes, seed=2)
    lists = recgpt.exact_recommender(decoder, catalog, True)
    assert lists.settings == CodeBeamConfig(widths=(10, 20), extensions=5, exclude_history=True)
    assert lists.recommend(np.array([0]), {0: [3]}, 4).shape == (1, 4)


# ---- no beam temperature -----------------------------------------------------------------------------------

def test_an_old_recipes_beam_temperature_is_accepted_and_ignored_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="recalign"):
        beam = recgpt.RecGPTBeamConfig(temperature=0.5)
    assert not hasattr(beam, "temperature") and "temperature" not in beam.model_dump()
    assert beam == recgpt.RecGPTBeamConfig()
    warned = [r for r in caplog.records if "beam.temperature is ignored" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "never changes" in warned[0].getMessage() and "\n" not in warned[0].getMessage()
    # a whole stage config with an old recipe's beam block (the benchmarks' dicts) validates too, to the same settings
    old = RecGPTConfig(beam={"widths": [10, 20], "extensions": 5, "temperature": 0.1})
    assert old.beam == recgpt.RecGPTBeamConfig() and old.fingerprint_dump() == RecGPTConfig().fingerprint_dump()
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="temperatur"):  # other unknown keys are still refused
        recgpt.RecGPTBeamConfig(temperatur=0.5)


def test_a_positive_temperature_never_changes_an_exact_list_or_a_beam():
    """Why there is no `beam.temperature`: log_softmax(z / T) = z / T - logsumexp(z / T) per position, so an item's
    summed code log-prob is (1/T) x its summed logits minus one constant per user: every ranking is the same."""
    catalog = toy_catalog()
    decoder = tiny_decoder(catalog.codes.sizes, seed=1)
    rng = np.random.default_rng(5)
    histories = [rng.choice(30, size=int(rng.integers(1, 6)), replace=False).tolist() for _ in range(12)]
    with torch.no_grad():  # the logits after each history's last item, unpadded (no temperature anywhere)
        logits = torch.stack([decoder(torch.tensor([h]), catalog.codes, catalog.vectors)[0, -1] for h in histories])
    trie, seen = CodeTrie.build(catalog.codes), history_mask(histories, 30)
    plain, cold = torch.log_softmax(logits, dim=-1), torch.log_softmax(logits / 0.1, dim=-1)
    assert not torch.allclose(plain, cold)  # the temperature changes every score ...
    for exclude in (seen, None):  # ... and no exact list
        assert torch.equal(top_items(exact_scores(plain, trie, exclude), 30),
                           top_items(exact_scores(cold, trie, exclude), 30))
    for widths, extensions in (((2, 3), 1), ((3, 5), 2), ((10, 20), 3)):  # nor the beams kept at any depth
        settings = CodeBeamConfig(widths=widths, extensions=extensions)
        assert torch.equal(beam_search(plain, trie, settings, seen).items,
                           beam_search(cold, trie, settings, seen).items), widths
