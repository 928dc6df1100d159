"""TrackRec's LLM side: prompts, the stand-in teacher, the all-wrong filter, the LLM test and the resumable loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recalign.methods.trackrec.prompts import (CtrSample, cot_messages, ctr_messages, parse_answer, render,
                                           validator_answer, validator_messages)
from recalign.methods.trackrec.algorithm import (TitleCatalog, CtrRows, build_preferences, llm_test_metrics,
                                       run_trackrec, stand_in_cots)
from recalign.methods.trackrec.config import TrackRecConfig

TITLES = ["Heat", "Casino", "Fargo", "Toy Story", "Alien", "Babe", "Clue", "Jaws"]
CATEGORIES = [["Crime"], ["Crime", "Drama"], ["Crime"], ["Animation"], ["Horror", "Sci-Fi"], ["Comedy"],
              ["Comedy", "Crime"], ["Horror"]]
CATALOG = TitleCatalog(TITLES, CATEGORIES, {0: {"gender": "M", "age": 25, "occupation": "writer"}, 1: {}})


def _rows(n: int, seed: int) -> CtrRows:
    rng = np.random.default_rng(seed)
    history = rng.integers(0, len(TITLES), size=(n, 4))
    history[:, 0] = -1  # left padding
    return CtrRows(user=np.arange(n) % 2, item=rng.integers(0, len(TITLES), n), label=np.arange(n) % 2,
                   history=history, history_rating=rng.integers(1, 6, size=(n, 4)).astype(np.float32))


def test_prompts_of_section_2_2():
    sample = CtrSample("Fargo", [("Heat", 5.0), ("Casino", 4.0)], {"gender": "M", "age": 25})
    ctr = ctr_messages(sample)
    assert ctr[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert ctr[1]["content"] == ("The user's profile: gender M, age 25.\n"
                                 "The user rated these movies (oldest first): 'Heat', 5 stars; 'Casino', 4 stars\n"
                                 "Will the user like the movie 'Fargo'? Answer Yes or No.")
    cot = cot_messages(sample)[1]["content"]
    assert cot.splitlines()[:2] == ctr[1]["content"].splitlines()[:2]
    assert cot.splitlines()[2] == "Please summarize the user's movie watch preference within 200 words."
    v = validator_messages(sample, " likes crime ")[1]["content"]
    assert v.startswith(ctr[1]["content"] + "\n")
    assert "<summary>likes crime</summary>" in v and v.endswith("Only output the result (Yes or No).")
    assert validator_answer(1) == "Yes" and validator_answer(0) == "No"
    assert [parse_answer(t) for t in ("Yes.", " no", "NO!", "Maybe", "", "Yesterday")] == [1, 0, 0, None, None, None]


def test_one_chat_template_for_every_step():
    from recalign.llm.models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer(progress=False)
    text = render(tokenizer, cot_messages(CtrSample("Fargo", [("Heat", 5.0)])))
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_stand_in_teacher_summarises_liked_disliked_and_categories():
    rows = CtrRows(user=np.array([0]), item=np.array([7]), label=np.array([1]),
                   history=np.array([[-1, 0, 3, 1, 6]]), history_rating=np.array([[0, 5, 1, 4, 4]], np.float32))
    # liked (most recent first): Clue, Casino, Heat; disliked: Toy Story; liked categories: Crime x3, Comedy, Drama
    assert stand_in_cots(rows, CATALOG) == [
        "The user enjoyed 'Clue', 'Casino', 'Heat'. The user disliked 'Toy Story'. "
        "Favourite categories: Crime, Comedy, Drama."]


def test_all_wrong_filter_drops_exactly_the_right_rows():
    scores = torch.tensor([[0.9, 0.2, 0.6],    # label 1: rewards .9 .2 .6 -> kept, chosen 0
                           [0.3, 0.4, 0.1],    # label 1: rewards .3 .4 .1 -> all wrong, dropped
                           [0.7, 0.8, 0.6],    # label 0: rewards .3 .2 .4 -> all wrong, dropped
                           [0.7, 0.2, 0.9],    # label 0: rewards .3 .8 .1 -> kept, chosen 1
                           [0.5, 0.5, 0.5]])   # label 1: rewards .5 (not better than chance) -> dropped
    prefs = build_preferences(scores, np.array([1, 1, 0, 0, 1]), n_negatives=2, seed=0)
    assert prefs.kept.tolist() == [0, 3]
    assert prefs.dropped_all_wrong == 3
    assert prefs.chosen.tolist() == [0, 1]
    assert sorted(prefs.negatives[0].tolist()) == [1, 2] and sorted(prefs.negatives[1].tolist()) == [0, 2]
    assert torch.allclose(prefs.rewards[3], torch.tensor([0.3, 0.8, 0.1]))


def test_llm_test_counts_unparsable_answers_as_wrong():
    metrics = llm_test_metrics(np.array([1, 0, 1, 0]), torch.tensor([0.9, 0.2, 0.4, 0.6]), [1, 0, None, 1])
    assert metrics["acc"] == 0.5            # the None answer is wrong, not dropped
    assert metrics["valid_ratio"] == 0.75
    assert metrics["auc"] == pytest.approx(0.75)  # positive > negative in 3 of 4 pairs
    # −(ln .9 + ln .8 + ln .4 + ln .4) / 4
    assert metrics["logloss"] == pytest.approx(-(math.log(.9) + math.log(.8) + 2 * math.log(.4)) / 4, abs=1e-6)
    assert metrics["logloss"] == pytest.approx(0.540272, abs=1e-6)


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_two_iterations_on_tiny_model_resume_after_a_kill(tmp_path):
    import pandas as pd

    config = TrackRecConfig(
        model="tiny", iterations=2, n_samples=3, train_rows=6, test_rows=4, device="cpu",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        distill={"max_steps": 1, "batch_size": 6, "learning_rate": 1e-3, "max_length": 384},
        sdpo={"max_steps": 1, "batch_size": 3, "learning_rate": 1e-3, "max_length": 384},
        rec_tuning={"max_steps": 1, "batch_size": 6, "learning_rate": 1e-3, "max_length": 384},
        decoding={"max_new_tokens": 8, "batch_size": 6})
    train, test = _rows(8, 0), _rows(5, 1)
    started: list[int] = []

    def kill_at_two(iteration: int) -> None:
        started.append(iteration)
        if iteration == 2:
            raise _Killed

    with pytest.raises(_Killed):
        run_trackrec(config, train, test, CATALOG, tmp_path / "work", on_iteration_start=kill_at_two)
    assert (tmp_path / "work" / "align" / "iter_1" / "metrics.json").is_file()
    assert not (tmp_path / "work" / "align" / "iter_2").exists()
    first_mtime = (tmp_path / "work" / "align" / "iter_1" / "metrics.json").stat().st_mtime_ns

    started.clear()
    summary = run_trackrec(config, train, test, CATALOG, tmp_path / "work", on_iteration_start=started.append)
    assert started == [2]  # iteration 1 is not recomputed
    assert (tmp_path / "work" / "align" / "iter_1" / "metrics.json").stat().st_mtime_ns == first_mtime
    records = summary["iterations"]
    assert [(r["loop"], r["iteration"]) for r in records] == [("distill", 0), ("align", 1), ("align", 2)]
    assert records[0]["teacher"] == "stand-in summariser (deterministic, not an LLM)"
    for record in records:
        assert 0.0 <= record["acc"] <= 1.0 and 0.0 <= record["valid_ratio"] <= 1.0 and record["n_test"] == 4
        assert record["logloss"] > 0
    for record in records[1:]:
        assert record["preferences"] + record["dropped_all_wrong"] == 6
    cots = pd.read_parquet(tmp_path / "work" / "align" / "iter_2" / "cots.parquet")
    assert list(cots.columns) == ["user", "item", "label", "part", "prompt", "cot"]
    assert (cots["part"] == "train").sum() == 6 and (cots["part"] == "test").sum() == 4
    assert cots["prompt"].str.endswith("Answer Yes or No.").all()
    teacher = pd.read_parquet(tmp_path / "work" / "distill" / "teacher_cots.parquet")
    assert teacher["cot"].str.startswith("The user enjoyed").all()
    assert (tmp_path / "work" / "align" / "iter_2" / "verifier" / "adapter_config.json").is_file()


def test_stage_kind_is_registered_and_params_are_checked():
    from pydantic import ValidationError

    from recalign.methods import get_stage

    stage = get_stage("trackrec")
    params = stage.params.model_validate({"model": "tiny", "teacher": {"kind": "stand-in"}, "iterations": 2})
    assert params.history_len == 10 and params.threshold == 4.0 and params.split == [0.8, 0.1, 0.1]
    assert stage.reads == frozenset({"data", "seed"})
    with pytest.raises(ValidationError):
        stage.params.model_validate({"n_sample": 3})  # unknown key (typo of n_samples)
    with pytest.raises(ValidationError):
        stage.params.model_validate({"teacher": {"kind": "gpt4o"}})
