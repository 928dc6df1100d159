"""SPRec (recalign.methods.sprec.algorithm): preference pairs, beyond-accuracy metrics by hand, and the resumable loop."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.data.dataset import build_dataset
from recalign.data.split import leave_one_out_split
from recalign.llm.grounding import ExactGrounder
from recalign.llm.tasks import Rows, eval_rows, sample_rows
from recalign.methods.sprec.algorithm import sprec_list_metrics, random_pairs, self_play_pairs, train_rows

TITLES = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta"]


def _rows(targets: list[int]) -> Rows:
    return Rows(np.arange(len(targets)), [[5]] * len(targets), np.asarray(targets, dtype=np.int64))


def test_self_play_rejected_is_the_grounded_answer_and_never_the_target():
    rows = _rows([0, 1, 2, 3, 4])
    answers = ['"Beta"\n', '"Beta"\n', "", '"Not a book"', '"Alpha" is nice']
    pairs = self_play_pairs(rows, answers, ExactGrounder(TITLES), TITLES)
    # row 1 names its own target, row 2 says nothing, row 3 names no catalog item: all three are dropped
    assert pairs.dropped_equal == 1 and pairs.dropped_ungrounded == 2
    assert pairs.rows.targets.tolist() == [0, 4]
    assert pairs.rejected_items.tolist() == [1, 0]
    assert pairs.rejected_titles == ["Beta", "Alpha"]
    assert pairs.generations == ['"Beta"\n', '"Alpha" is nice']
    assert (pairs.rejected_items != pairs.rows.targets).all()


def test_self_play_parity_mode_keeps_raw_titles_unchecked():
    rows = _rows([1, 2])
    pairs = self_play_pairs(rows, ['"Beta"', '"Nope"'], ExactGrounder(TITLES), TITLES, check=False)
    assert len(pairs) == 2 and pairs.rejected_titles == ["Beta", "Nope"]  # the original keeps rejected == chosen


def test_random_negatives_are_seeded_uniform_and_never_the_target():
    rows = _rows([0, 3, 5] * 400)
    first = random_pairs(rows, len(TITLES), TITLES, seed=7)
    again = random_pairs(rows, len(TITLES), TITLES, seed=7)
    assert np.array_equal(first.rejected_items, again.rejected_items)
    assert (first.rejected_items != rows.targets).all()
    assert set(first.rejected_items[rows.targets == 3].tolist()) == {0, 1, 2, 4, 5}


def test_beyond_accuracy_metrics_match_hand_computed_values():
    lists = torch.tensor([[0, 1], [0, 2], [3, 0]])
    targets = torch.tensor([1, 3, 3])
    histories = [[1], [1, 2], [0]]
    popularity = torch.tensor([10, 4, 2, 0])
    item_genres = [["a"], ["b"], ["a", "b"], []]
    m = sprec_list_metrics(lists, targets, histories, [1, 2], popularity, item_genres, ["a", "b"])
    # K = 2: distinct {0,1,2,3} over 3·2 slots; item 0 in 3 lists, the next two in 1 each
    assert m["div_ratio@2"] == pytest.approx(4 / 6)
    assert m["or_ratio@2"] == pytest.approx(5 / 6)
    assert m["avg_pop@2"] == pytest.approx((7 + 6 + 5) / 3)
    # GH over history items 1, 1, 2, 0: a = 0+0+0.5+1 = 1.5, b = 1+1+0.5 = 2.5 -> (0.375, 0.625)
    # GP over 0,1 | 0,2 | 3,0: a = 1+1+0.5+1 = 3.5, b = 1+0.5 = 1.5 -> (0.7, 0.3); d = (0.325, -0.325)
    assert m["mgu@2"] == pytest.approx(0.325)
    assert m["dgu@2"] == pytest.approx(0.65)
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    # K = 1: lists 0, 0, 3 -> GP = (1, 0) (item 3 has no tracked genre), d = (0.625, -0.625)
    assert m["div_ratio@1"] == pytest.approx(2 / 3)
    assert m["or_ratio@1"] == pytest.approx(1.0)
    assert m["mgu@1"] == pytest.approx(0.625)
    assert m["dgu@1"] == pytest.approx(1.25)
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["avg_pop@1"] == pytest.approx((10 + 10 + 0) / 3)


def _toy_dataset(n_users: int = 12, n_items: int = len(TITLES), length: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(n_users):
        start = int(rng.integers(n_items))
        for t in range(length):  # a cyclic "next title" pattern the model can learn
            rows.append({"user": f"u{user}", "item": f"i{(start + t) % n_items}", "timestamp": t})
    items = pd.DataFrame({"item": [f"i{i}" for i in range(n_items)], "title": TITLES,
                          "categories": [["a"], ["b"], ["a", "b"], ["c"], ["a"], []]})
    return build_dataset(pd.DataFrame(rows), items=items, name="toy", source="synthetic")


def test_rows_follow_the_split():
    dataset = _toy_dataset()
    split = leave_one_out_split(dataset)
    train = train_rows(dataset, split, max_history=2)
    test = eval_rows(dataset, split, "test", max_history=10)
    seqs = dataset.sequences()
    user = int(test.users[0])
    assert test.histories[0] == seqs[user][:-1].tolist() and test.targets[0] == seqs[user][-1]
    row = int(np.flatnonzero(train.users == user)[0])
    assert train.histories[row] == seqs[user][0:2].tolist() and train.targets[row] == seqs[user][2]
    assert len(train_rows(dataset, split, 2, users="train_only")) == 0  # every toy user has a test item
    picked = sample_rows(train, 5, seed=1)
    assert len(picked) == 5 and len(set(picked.users.tolist())) == 5


# ---- the loop on a tiny random model ----------------------------------------------------------------------

from recalign.methods.sprec.algorithm import run_sprec  # noqa: E402
from recalign.methods.sprec.config import SPRecConfig  # noqa: E402


def _config(**overrides) -> SPRecConfig:
    settings = dict(
        model="tiny", iterations=2, n_pairs=8, max_history=3, sft_rows=16,
        # enough stage-0 SFT that the tiny model answers with a quoted title (self-play needs named items)
        sft={"epochs": 1, "learning_rate": 1e-2, "batch_size": 8, "grad_accum": 1, "max_steps": 20, "max_length": 512},
        sft_step={"epochs": 1, "learning_rate": 1e-3, "batch_size": 8, "grad_accum": 1, "max_steps": 1,
                  "max_length": 512},
        dpo={"learning_rate": 1e-3, "batch_size": 4, "grad_accum": 1, "max_steps": 2, "max_length": 512},
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        # every non-empty answer grounds to its nearest title by edit similarity (threshold 0), like embedding k-NN
        grounding={"kind": "fuzzy", "metric": "ratio", "threshold": 0},
        pair_generation={"max_new_tokens": 8, "batch_size": 8},
        eval_generation={"max_new_tokens": 8, "batch_size": 8},
        ks=[1, 5], genres=["a", "b", "c"], seed=0)
    settings.update(overrides)
    return SPRecConfig(**settings)


def test_loop_pairs_are_own_grounded_answers_and_resume_after_a_kill(tmp_path):
    import json

    from recalign.llm.grounding import extract_title, make_grounder

    dataset = _toy_dataset(n_users=16)
    split = leave_one_out_split(dataset)
    config = _config(variants=["sft", "sprec"])
    started: list[tuple[str, int]] = []

    def kill_in_iteration_2(variant: str, iteration: int) -> None:
        started.append((variant, iteration))
        if iteration == 2:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_sprec(config, dataset, split, tmp_path, on_iteration_start=kill_in_iteration_2)
    first = tmp_path / "sprec" / "iter_1"
    assert (first / "metrics.json").is_file() and not (tmp_path / "sprec" / "iter_2").exists()
    state = json.loads((tmp_path / "state.json").read_text())
    assert [(r["variant"], r["iteration"]) for r in state["iterations"]] == [("sft", 0), ("sprec", 1)]
    stamp = (first / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns

    resumed: list[tuple[str, int]] = []
    summary = run_sprec(config, dataset, split, tmp_path, on_iteration_start=lambda v, i: resumed.append((v, i)))
    assert resumed == [("sprec", 2)]  # neither SFT nor iteration 1 ran again
    assert (first / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert [(r["variant"], r["iteration"]) for r in summary["iterations"]] == [("sft", 0), ("sprec", 1), ("sprec", 2)]
    for record in summary["iterations"]:
        assert 0.0 <= record["hr@5"] <= 1.0 and 0.0 <= record["div_ratio@5"] <= 1.0
        if record["variant"] == "sprec":  # every sampled prompt is a pair or counted as dropped
            assert record["pairs"] + record["dropped_equal"] + record["dropped_ungrounded"] == config.n_pairs

    grounder = make_grounder(config.grounding, dataset.titles())
    for iteration in (1, 2):
        pairs = [json.loads(line) for line in
                 (tmp_path / "sprec" / f"iter_{iteration}" / "pairs.jsonl").read_text().splitlines()]
        assert pairs, "the SFT'd tiny model names titles, so self-play must yield pairs"
        own = grounder.ground([extract_title(p["generation"]) for p in pairs]).tolist()
        assert [p["rejected"] for p in pairs] == own  # the model's own answers, grounded
        assert all(p["rejected"] != p["chosen"] for p in pairs)
        answers = [json.loads(line) for line in
                   (tmp_path / "sprec" / f"iter_{iteration}" / "eval_answers.jsonl").read_text().splitlines()]
        assert len(answers) == summary["iterations"][iteration]["n_rows"]
        hits = np.mean([a["target"] in a["top_k"][:5] for a in answers])  # the per-row file gives back HR@5
        assert hits == pytest.approx(summary["iterations"][iteration]["hr@5"])
    # paired bootstrap against SFT; a checkpoint without per-row answers is re-evaluated and must reproduce itself
    from recalign.methods.sprec.report import compare_against_sft

    (tmp_path / "sprec" / "iter_1" / "eval_answers.jsonl").unlink()
    intervals = compare_against_sft(config, dataset, split, tmp_path, keys=("hr@5", "or_ratio@5"), n_resamples=50)
    assert (tmp_path / "sprec" / "iter_1" / "eval_answers.jsonl").is_file()
    assert [(r["variant"], r["iteration"]) for r in intervals] == [("sprec", 1), ("sprec", 2)]
    for r, record in zip(intervals, summary["iterations"][1:]):
        for key in ("hr@5", "or_ratio@5"):
            boot, perm = r["bootstrap"][key], r["permutation"][key]
            assert boot["diff"] == pytest.approx(record[key] - summary["iterations"][0][key]) == perm["diff"]
            assert boot["low"] <= boot["diff"] + 1e-9 and boot["diff"] <= boot["high"] + 1e-9
            assert 1 / 51 <= perm["p_value"] <= 1.0
    fewer = compare_against_sft(config, dataset, split, tmp_path, keys=("hr@5",), n_resamples=20, eval_rows=8)
    saved = (tmp_path / "sprec" / "iter_2" / "eval_answers_8rows.jsonl").read_text().splitlines()
    assert len(saved) == 8 and len(fewer) == 2  # other rows: evaluated again into their own file, own answers kept
    assert len((tmp_path / "sprec" / "iter_2" / "eval_answers.jsonl").read_text().splitlines()) == 16
    from recalign.methods.sprec.report import iteration_table, plot_iterations

    table = iteration_table(summary)
    assert table.count("\n| sprec |") == 2 and "| sft | 0 |" in table
    png = plot_iterations(summary, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recipe_stage_writes_report_and_resumes_with_more_iterations(tmp_path):
    """`recalign run` path: the sprec stage's folder, its comparison with SFT, and a longer re-run that resumes."""
    import json

    from recalign.recipes import recipe_from_dict
    from recalign.runs import run_recipe

    stage = _config(variants=["sft", "sprec"], iterations=1, compare_resamples=20).model_dump(
        mode="json", exclude={"ks", "eval_rows"})  # recipe-wide: eval.ks, eval.users

    def spec(iterations: int):
        return recipe_from_dict({
            "name": "sprec-tiny", "seed": 0,
            "data": {"source": "synthetic", "options": {"n_users": 24, "n_items": 12, "min_length": 5,
                                                        "max_length": 7}},
            "split": {"kind": "leave_one_out"}, "eval": {"ks": [1, 5]},
            "stages": [{"name": "sprec", "kind": "sprec", "params": {**stage, "iterations": iterations}}]})

    run_dir = tmp_path / "run"
    first = run_recipe(spec(1), run_dir, progress=False)["stages"]["sprec"]
    folder = run_dir / "stages" / "sprec"
    assert first["protocol"] == "full" and first["iterations"] == 1 and "sprec/hr@5" in first
    assert first["hr@5"] == first["sprec/hr@5"] and first["n_users"] == 24  # the recipe's users: all of them
    assert {p.name for p in (folder / "final").iterdir()} == {"sft", "sprec"}
    comparison = json.loads((folder / "comparison_vs_sft.json").read_text())
    assert [(c["variant"], c["iteration"]) for c in comparison] == [("sprec", 1)]
    assert comparison[0]["permutation"]["hr@5"]["diff"] == pytest.approx(first["sprec/hr@5"] - first["sft/hr@5"])
    iter_1 = next((run_dir / "work").glob("sprec-*")) / "sprec" / "iter_1" / "adapter" / "adapter_model.safetensors"
    stamp = iter_1.stat().st_mtime_ns

    again = run_recipe(spec(2), run_dir, progress=False)["stages"]["sprec"]
    assert again["iterations"] == 2 and iter_1.stat().st_mtime_ns == stamp  # iteration 1 was not trained again
    rows = json.loads((folder / "iterations.json").read_text())
    assert [(r["variant"], r["iteration"]) for r in rows] == [("sft", 0), ("sprec", 1), ("sprec", 2)]
