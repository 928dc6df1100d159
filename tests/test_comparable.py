"""Comparable by default: every stage of a recipe is scored on the same seeded test users by the same evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recalign.recipes import recipe_from_dict
from recalign.errors import ConfigError
from recalign.eval.evaluate import eval_users, relevant_items

torch.set_num_threads(1)

TINY_LLM = {"model": "tiny", "lora": {"r": 2, "alpha": 4, "dropout": 0.0}}
STAGES = [
    {"name": "pop", "kind": "teacher", "params": {"model": "popularity"}},
    {"name": "mf", "kind": "teacher", "params": {"model": "bprmf", "dim": 8, "epochs": 2}},
    {"name": "trd", "kind": "trd", "params": {
        "teacher": "mf", "cand_num": 20,
        "dqn": {"epochs": 1, "train_steps": 3, "learning_starts": 8, "batch_size": 8, "list_length": 10}}},
    {"name": "llm", "kind": "llm-sft", "params": {
        **TINY_LLM, "train_rows": 4, "batch_size": 8, "task": {"max_history": 3},
        "sft": {"max_steps": 1, "batch_size": 4, "max_length": 128}, "generation": {"max_new_tokens": 4},
        "grounding": {"kind": "fuzzy"}}},
    {"name": "sprec", "kind": "sprec", "params": {
        **TINY_LLM, "variants": ["sft", "sprec"], "iterations": 1, "n_pairs": 4, "sft_rows": 4, "max_history": 3,
        "sft": {"max_steps": 1, "batch_size": 4, "max_length": 128},
        "sft_step": None, "dpo": {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "max_length": 128},
        "grounding": {"kind": "fuzzy", "metric": "ratio", "threshold": 0},
        "pair_generation": {"max_new_tokens": 4}, "eval_generation": {"max_new_tokens": 4},
        "compare_resamples": 5}},
]


def _recipe(stages=STAGES, users=12):
    return recipe_from_dict({
        "name": "cmp", "seed": 3, "data": {"source": "synthetic", "options": {"n_users": 40, "n_items": 30,
                                                                               "min_length": 5, "max_length": 8}},
        "split": {"kind": "leave_one_out"}, "eval": {"ks": [1, 5, 10], "users": users}, "stages": stages})


@pytest.fixture(scope="module")
def comparable_run(tmp_path_factory):
    from recalign.runs import run_recipe

    folder = tmp_path_factory.mktemp("cmp") / "run"
    return folder, run_recipe(_recipe(), folder, progress=False)


def test_every_stage_is_scored_on_the_same_seeded_users(comparable_run):
    from recalign.runs import open_run
    from recalign.stages import users_hash

    folder, summary = comparable_run
    stages = summary["stages"]
    assert list(stages) == ["pop", "mf", "trd", "llm", "sprec"]
    assert {m["n_users"] for m in stages.values()} == {12}
    assert len({m["users_hash"] for m in stages.values()}) == 1
    assert {m["protocol"] for m in stages.values()} == {"full"}
    # The hash is the one of the recipe's seeded subset (seed = the recipe seed 3) of the test users.
    recipe, dataset, split = open_run(folder)
    eligible, _, _ = relevant_items(split.test, dataset.n_users)
    expected = eval_users(eligible, 12, seed=3)
    assert stages["pop"]["users_hash"] == users_hash(expected) != users_hash(eval_users(eligible, 12, seed=4))
    # LLM rows carry the valid-answer ratio; TRD's teacher is scored on the same users beside it.
    assert 0.0 <= stages["llm"]["valid_ratio"] <= 1.0 and 0.0 <= stages["sprec"]["valid_ratio"] <= 1.0
    assert stages["trd"]["teacher.ndcg@10"] == pytest.approx(stages["mf"]["ndcg@10"])
    assert stages["sprec"]["headline"] == "sprec"


def test_the_report_has_no_own_protocol_note(comparable_run):
    folder, _ = comparable_run
    text = (folder / "report.md").read_text()
    assert "| trd |" in text and "| sprec |" in text
    assert "Not comparable" not in text and "own protocol" not in text


def test_sprec_keeps_answers_per_user_for_the_paired_comparison(comparable_run):
    import json

    folder, summary = comparable_run
    work = summary["stages"]["sprec"]["work_dir"]
    from pathlib import Path

    answers = [json.loads(line) for line in (Path(work) / "sft" / "eval_answers.jsonl").read_text().splitlines()]
    recipe, dataset, split = __import__("recalign.runs", fromlist=["open_run"]).open_run(folder)
    eligible, _, _ = relevant_items(split.test, dataset.n_users)
    assert [a["user"] for a in answers] == eval_users(eligible, 12, seed=3).tolist()
    assert (folder / "stages" / "sprec" / "comparison_vs_sft.md").is_file()


def test_a_parity_protocol_brings_the_note_back(tmp_path):
    from recalign.runs import run_recipe

    stages = [STAGES[1], {**STAGES[2], "params": {**STAGES[2]["params"], "protocol": "trd_temporal",
                                                 "teacher": "bprmf", "teacher_source": "model",
                                                 "teacher_params": {"dim": 8, "epochs": 2}}}]
    summary = run_recipe(_recipe(stages), tmp_path / "run", progress=False)
    assert summary["stages"]["trd"]["protocol"] == "trd_temporal"
    text = (tmp_path / "run" / "report.md").read_text()
    assert "Not comparable across rows: trd (trd_temporal" in text


@pytest.mark.parametrize("kind, key, target", [("llm-sft", "ks", "eval.ks"), ("sprec", "eval_rows", "eval.users"),
                                               ("trd", "ks", "eval.ks")])
def test_stage_level_eval_settings_point_to_the_recipe(kind, key, target):
    with pytest.raises(ConfigError, match=rf"stages\.x\.params\.{key}: .*set {target} instead"):
        _recipe([{"name": "x", "kind": kind, "params": {key: [5] if key == "ks" else 10}}])


def test_eval_users_is_a_positive_count():
    with pytest.raises(ConfigError, match="eval.users"):
        _recipe(STAGES[:1], users=0)
    assert _recipe(STAGES[:1], users=None).eval.users is None


def test_eval_users_are_the_same_for_every_model():
    # eval_users is a pure function of (eligible users, n, seed): hand-checked on a tiny case.
    eligible = np.arange(10, 20)
    chosen = eval_users(eligible, 4, seed=0)
    assert len(chosen) == 4 and (np.diff(chosen) > 0).all() and set(chosen) <= set(eligible.tolist())
    assert eval_users(eligible, 4, seed=0).tolist() == chosen.tolist()
    assert eval_users(eligible, None, seed=0).tolist() == eligible.tolist()


def test_trd_lists_reorder_the_teachers_top_list_without_history():
    """RerankedLists: each user's list is drawn from the teacher's top-cand_num items, history excluded, no repeats."""
    import pandas as pd

    from recalign.data.dataset import build_dataset
    from recalign.data.split import leave_one_out_split
    from recalign.methods.trd.algorithm import RerankedLists
    from recalign.methods.trd.config import DQNConfig
    from recalign.methods.trd.dqn import DQNReranker
    from recalign.teachers.popularity import Popularity

    # 3 users x 4 interactions over 8 items; item i0 is the most popular, then i1, i2, ...
    rows = [("u0", "i0", 0), ("u0", "i1", 1), ("u0", "i2", 2), ("u0", "i3", 3),
            ("u1", "i0", 0), ("u1", "i1", 1), ("u1", "i4", 2), ("u1", "i5", 3),
            ("u2", "i0", 0), ("u2", "i2", 1), ("u2", "i6", 2), ("u2", "i7", 3)]
    dataset = build_dataset(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), name="t", source="test")
    split = leave_one_out_split(dataset)
    teacher = Popularity().fit(dataset, split.train)
    history = dataset.sequences(split.history("test"))
    student = DQNReranker(torch.zeros(3, 4), torch.zeros(8, 4), DQNConfig(n_actions=2, list_length=3, seed=0))
    lists = RerankedLists(teacher, student, cand_num=3).recommend(np.arange(3), history, k=3)
    top, _ = teacher.recommend(np.arange(3), history, k=3, exclude_history=True)
    assert lists.shape == (3, 3)
    for user in range(3):
        picked = [i for i in lists[user].tolist() if i >= 0]
        assert sorted(picked) == sorted(top[user].tolist())          # the teacher's top-3, re-ordered
        assert not set(picked) & set(history[user].tolist())        # never an item of the user's history


def test_sprec_rows_is_a_named_parity_protocol(tmp_path):
    from recalign.runs import run_recipe

    sprec = {**STAGES[4], "params": {**STAGES[4]["params"], "variants": ["sft"], "protocol": "sprec_rows",
                                     "compare_resamples": 0}}
    summary = run_recipe(_recipe([sprec], users=6), tmp_path / "run", progress=False)
    metrics = summary["stages"]["sprec"]
    assert metrics["protocol"] == "sprec_rows" and metrics["headline"] == "sft" and metrics["n_rows"] == 6
    assert "users_hash" not in metrics  # SPRec's own seeded rows, not the recipe's users
    assert "Not comparable across rows: sprec (sprec_rows" in (tmp_path / "run" / "report.md").read_text()
