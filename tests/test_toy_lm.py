"""The toy LM (recalign.llm.toy, recipe kind "toy-lm"), `model: stage:<name>` references and recipe claims.

The mechanism test trains the toy LM from scratch on synthetic data whose structure is known (each item has a
fixed successor) and checks, through the run's own claims table, that it ranks above Popularity. Injected faults
it catches: pre-training on shuffled windows (no sequence left to learn), a next-title scorer that reads the wrong
position, a claim verdict with the sign flipped.
"""

from __future__ import annotations

import pytest
import torch

from recalign.errors import ConfigError
from recalign.llm.toy import word_tokenizer
from recalign.recipes import recipe_from_dict
from recalign.runs import run_recipe

TITLES = ["Red Ocean 1", "Quiet River 1", "Red Ocean 2"]


def test_word_tokenizer_keeps_text_exactly_and_makes_each_title_one_token():
    tok = word_tokenizer(['Given a list, recommend one: "A" or "B".\n1. two', *TITLES], titles=TITLES)
    text = 'Given a list, recommend one: "Red Ocean 1", "Quiet River 1"\n1. "Red Ocean 2"'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert [tok.convert_ids_to_tokens(i) for i in ids].count("Red Ocean 1") == 1
    assert len(tok("Red Ocean 2", add_special_tokens=False)["input_ids"]) == 1  # a title is one prediction
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"


def _recipe(stages: list[dict], claims: list[dict] | None = None, n_users: int = 600) -> dict:
    return {"name": "toy", "seed": 0,
            "data": {"source": "synthetic", "options": {"n_users": n_users, "n_items": 200, "max_length": 20,
                                                        "follow_prob": 0.8}},
            "split": {"kind": "leave_one_out"}, "eval": {"ks": [10], "users": 150},
            "stages": stages, "claims": claims or []}


POPULARITY = {"name": "popularity", "kind": "teacher", "params": {"model": "popularity"}}
TOY_LM = {"name": "toy-lm", "kind": "toy-lm", "params": {"epochs": 4}}
CLAIM = {"method": "toy LM", "claim": "above Popularity", "row": "toy-lm", "baseline": "popularity",
         "metric": "hr@10", "expect": "higher"}


def test_toy_lm_learns_the_successor_structure_and_its_claim_holds(tmp_path):
    torch.set_num_threads(1)
    summary = run_recipe(recipe_from_dict(_recipe([POPULARITY, TOY_LM], [CLAIM])), tmp_path / "run", progress=False)
    toy, pop = summary["stages"]["toy-lm"], summary["stages"]["popularity"]
    assert toy["hr@10"] > pop["hr@10"] + 0.15, (toy["hr@10"], pop["hr@10"])
    (claim,) = summary["claims"]
    assert claim["verdict"] == "holds" and claim["low"] > 0
    assert claim["value"] == pytest.approx(toy["hr@10"]) and claim["baseline_value"] == pytest.approx(pop["hr@10"])
    model = tmp_path / "run" / "stages" / "toy-lm" / "model"
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Claims" in report and "| toy LM | above Popularity | hr@10 |" in report


def test_model_reference_names_an_earlier_stage():
    later = {"name": "sft", "kind": "llm-sft", "params": {"model": "stage:toy-lm"}}
    with pytest.raises(ConfigError, match="does not run before"):
        recipe_from_dict(_recipe([POPULARITY, later, TOY_LM]))
    with pytest.raises(ConfigError, match="no stage named 'nothing'"):
        recipe_from_dict(_recipe([POPULARITY, {**later, "params": {"model": "stage:nothing"}}]))
    with pytest.raises(ConfigError, match="claims"):
        recipe_from_dict(_recipe([POPULARITY], [{**CLAIM, "row": "missing"}]))


def test_llm_sft_fine_tunes_the_toy_lm_through_its_reference(tmp_path):
    """The llm-sft stage loads `stage:toy-lm` (the saved folder) and its SFT row beats Popularity."""
    torch.set_num_threads(1)
    sft = {"name": "llm-sft", "kind": "llm-sft", "params": {
        "model": "stage:toy-lm", "train_rows": None, "batch_size": 64, "task": {"max_history": 10, "rows_per_user": 4},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "sft": {"epochs": 1, "batch_size": 16, "learning_rate": 3e-3, "max_length": 192},
        "generation": {"max_new_tokens": 4}, "decodings": ["constrained"], "grounding": {"kind": "fuzzy"}}}
    claim = {**CLAIM, "row": "llm-sft", "method": "LLM SFT"}
    summary = run_recipe(recipe_from_dict(_recipe([POPULARITY, TOY_LM, sft], [claim])), tmp_path / "run",
                         progress=False)
    row = summary["stages"]["llm-sft"]
    assert row["model"] == "stage:toy-lm"  # the recipe's reference, not a machine path
    assert summary["claims"][0]["verdict"] == "holds", (row["hr@10"], row.get("sft_loss_last"), summary["claims"][0])
