"""The `controllable` stage (RecLM-gen): SFT -> PPO / GRPO -> §5.6 test tasks, on a tiny model and synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recalign.recipes import recipe_from_dict
from recalign.errors import ConfigError
from recalign.methods.reclmgen.metrics import CategoryTable
from recalign.methods.reclmgen.tasks import ControlRequest
from recalign.llm.tasks import Rows
from recalign.methods.reclmgen.algorithm import score_answers
from recalign.methods.reclmgen.answers import TaskAnswers
from recalign.methods.reclmgen.baselines import compare_tasks, teacher_answers
from recalign.methods.reclmgen.stage import AnsweredLists

# ---- small pieces on hand-made numbers -------------------------------------------------------------------------

N_ITEMS = 8
# c0 = {0, 2, 4, 6}, c1 = {1, 3, 5, 7}
CATS = CategoryTable.from_item_categories([[f"c{i % 2}"] for i in range(N_ITEMS)])


class ScoreTeacher:
    """Brute force over one fixed score per item (item 0 best): topk with categories/candidates, ranks."""

    scores = torch.arange(N_ITEMS, 0, -1, dtype=torch.float64)

    def topk(self, histories, k, *, users=None, candidates=None, categories=None, exclude_history=True):
        out = torch.full((len(histories), k), -1, dtype=torch.long)
        for row, history in enumerate(histories):
            allowed = torch.ones(N_ITEMS, dtype=torch.bool)
            if candidates is not None:
                allowed = torch.isin(torch.arange(N_ITEMS), torch.as_tensor(candidates[row]))
            if categories is not None and categories[row] is not None:
                column = CATS.table[:, CATS.index(categories[row][1:])]
                allowed &= column if categories[row][0] == "+" else ~column
            allowed[torch.as_tensor(history, dtype=torch.long)] = False
            ranked = [i for i in range(N_ITEMS) if allowed[i]][:k]
            out[row, :len(ranked)] = torch.tensor(ranked, dtype=torch.long)
        return out

    def ranks(self, histories, candidates, users=None):
        return torch.as_tensor(candidates, dtype=torch.long)  # item i has rank i


def _rows(kind: str, k: int = 4, category: str | None = None, m: int | None = None, p: int | None = None):
    return Rows(np.array([7]), [[1]], np.array([3]), None, None, None,
                [ControlRequest(kind, k, category, p=p, m=m)])


def test_teacher_filter_answers_fulfil_each_request():
    teacher = ScoreTeacher()
    assert teacher_answers(teacher, "seqrec", _rows("seqrec")).grounded == [[0, 2, 3, 4]]  # history item 1 excluded
    assert teacher_answers(teacher, "+c", _rows("+c", category="c1")).grounded == [[3, 5, 7, -2]]  # only 3 left
    assert teacher_answers(teacher, "-c", _rows("-c", category="c1")).grounded == [[0, 2, 4, 6]]
    # EP 50% of 4: the best 2 of c1 (3, 5) and the best 2 outside (0, 2), in the teacher's order
    answer = teacher_answers(teacher, "ep_50", _rows("ep", category="c1", m=2, p=50))
    assert answer.grounded == [[0, 2, 3, 5]] and answer.n_outputs == [4] and answer.rule == ["EP"]


def test_scores_of_saved_answers_are_the_section_5_6_metrics():
    # two rows of +C (C = c0): row 0 answers [2, 5, unknown, 2] (target 5), row 1 answers [4] (target 4)
    answers = TaskAnswers(task="+c", users=[10, 11], targets=[5, 4], histories=[[0], [1]], k=[4, 4],
                          category=["c0", "c0"], rule=[None, None], m=[0, 0],
                          grounded=[[2, 5, -1, 2], [4, -2, -2, -2]], n_outputs=[4, 1])
    seqrec = TaskAnswers(task="seqrec", users=[11, 10], targets=[4, 5], histories=[[1], [0]], k=[4, 4],
                         category=[None, None], rule=[None, None], m=[0, 0],
                         grounded=[[1, 3, 5, 7], [0, 2, 1, -2]], n_outputs=[4, 3])
    metrics, _ = score_answers(answers, CATS, seqrec)
    assert metrics["recall"] == pytest.approx(1.0)
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["non_exist"] == pytest.approx((1 / 4 + 0) / 2)
    assert metrics["repeat"] == pytest.approx((1 / 4 + 0) / 2)
    assert metrics["correct_count"] == pytest.approx(0.5)
    # in C: row 0 counts 2 and 2 (items 2, 2: l_u keeps repeats) -> 2/4; row 1 counts 4 -> 1/4
    assert metrics["target_category_rate"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # the users' own SeqRec answers: user 10 -> [0, 2, 1] (2 in c0), user 11 -> [1, 3, 5, 7] (0 in c0)
    assert metrics["sr_target_category_rate"] == pytest.approx((2 / 4 + 0) / 2)
    lists = AnsweredLists(answers).recommend(np.array([11, 10]), None, 5)
    assert lists.grounded.tolist() == [[4, -2, -2, -2, -2], [2, 5, -1, 2, -2]]
    with pytest.raises(ConfigError, match="no saved answer"):
        AnsweredLists(answers).recommend(np.array([12]), None, 5)
    same = compare_tasks({"+c": answers}, {"+c": answers}, CATS, n_resamples=20)
    assert same["+c"]["recall"]["diff"] == 0.0 and same["+c"]["recall"]["low"] == 0.0


# ---- the stage end to end (tiny random Llama, synthetic data with categories) ---------------------------------

TINY = {"model": "tiny", "sft_epochs": 1, "sft_rows": 12, "control_re_items": 4,
        "sft": {"epochs": 1, "learning_rate": 1e-2, "batch_size": 4, "max_steps": 2, "max_length": 384},
        "rl_iterations": 2, "rl_rows": 8, "prompts_per_iteration": 2, "max_new_tokens": 12, "batch_size": 8,
        "ppo": {"max_new_tokens": 12, "mini_batch_size": 4, "ppo_epochs": 1, "generation_batch_size": 4},
        "grpo": {"max_new_tokens": 12, "batch_size": 2, "num_generations": 2, "max_steps": 1},
        "test_tasks": ["seqrec", "+c", "-c", "lp_20", "ep_30", "mp_30", "itemcount", "ranking"], "n_negatives": 5}


def _recipe(stages: list[dict]):
    return recipe_from_dict({
        "name": "reclmgen-tiny", "seed": 0,
        "data": {"source": "synthetic", "options": {"n_users": 30, "n_items": 24, "n_categories": 3,
                                                    "min_length": 5, "max_length": 8}},
        "split": {"kind": "leave_one_out"}, "eval": {"ks": [5, 10], "users": 6},
        "stages": [{"name": "pop", "kind": "teacher", "params": {"model": "popularity"}}, *stages]})


SFT = {"name": "sft", "kind": "reclmgen", "params": {**TINY, "teacher": "pop", "algorithm": "none"}}


@pytest.mark.slow
def test_stage_runs_sft_then_ppo_and_grpo_with_the_teachers_users_and_keys(tmp_path):
    from recalign.runs import run_recipe

    # the SFT stage says `reclmgen`, the RL stages its alias `controllable`: init_from accepts either
    ppo = {"name": "ppo", "kind": "controllable",
           "params": {**{k: v for k, v in TINY.items() if k != "model"}, "teacher": "pop", "init_from": "sft"}}
    grpo = {"name": "grpo", "kind": "controllable",
            "params": {**ppo["params"], "algorithm": "grpo", "reward": "list"}}
    run_dir = tmp_path / "run"
    result = run_recipe(_recipe([SFT, ppo, grpo]), run_dir, progress=False)["stages"]
    teacher = result["pop"]
    for name in ("sft", "ppo", "grpo"):
        stage = result[name]
        assert stage["users_hash"] == teacher["users_hash"] and stage["n_users"] == 6
        assert {k for k in teacher if "@" in k} <= set(stage)  # the SeqRec row has every teacher metric key
        for task in TINY["test_tasks"]:
            assert f"{task}/recall" in stage and 0.0 <= stage[f"{task}/non_exist"] <= 1.0
        assert "ep_30/category_rate_correct" in stage and "ranking/not_in_candidate" in stage
    assert result["ppo"]["model"] == "tiny" and result["ppo"]["rl_iterations"] == 2
    assert result["grpo"]["rl_iterations"] == 2
    # The SFT stage's SeqRec answers give its HR@10 row: recompute it from the saved answers by hand.
    saved = json.loads((run_dir / "stages" / "sft" / "answers" / "seqrec.json").read_text())
    assert len(saved["users"]) == 6 and len(saved["answers"]) == 6
    targets = dict(zip(saved["users"], saved["targets"]))
    hits = [targets[u] in [i for i in row[:10] if i >= 0] for u, row in zip(saved["users"], saved["grounded"])]
    assert result["sft"]["hr@10"] == pytest.approx(np.mean(hits))
    assert (run_dir / "stages" / "sft" / "sft_adapter" / "adapter_config.json").is_file()
    work = next((run_dir / "work").glob("ppo-*"))
    assert not (work / "sft").exists()  # init_from: the PPO stage reused the SFT stage's model
    assert (work / "ppo" / "iter_2" / "value_head.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_run_resumes_after_the_first_rl_iteration(tmp_path, monkeypatch):
    import recalign.methods.reclmgen.algorithm as method
    from recalign.runs import run_recipe

    stage = {"name": "ppo", "kind": "controllable", "params": {**TINY, "teacher": "pop", "algorithm": "ppo"}}
    real = method.make_reward_fn
    calls = {"n": 0}

    def dies_in_iteration_2(*args, **kwargs):
        reward_fn = real(*args, **kwargs)

        def counted(prompts, responses, ids):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("killed")
            return reward_fn(prompts, responses, ids)
        return counted

    monkeypatch.setattr(method, "make_reward_fn", dies_in_iteration_2)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe([stage]), run_dir, progress=False)
    work = next((run_dir / "work").glob("ppo-*"))
    assert (work / "sft" / "iter_1" / "metrics.json").is_file() and (work / "ppo" / "iter_1" / "metrics.json").is_file()
    assert not (work / "ppo" / "iter_2").exists() and not (run_dir / "stages" / "ppo").exists()
    sft_stamp = (work / "sft" / "iter_1" / "metrics.json").stat().st_mtime_ns
    iter_1 = (work / "ppo" / "iter_1" / "metrics.json").read_text()

    result = run_recipe(_recipe([stage]), run_dir, progress=False)["stages"]["ppo"]
    assert calls["n"] == 3  # iteration 2 only: SFT and iteration 1 were not redone
    assert (work / "sft" / "iter_1" / "metrics.json").stat().st_mtime_ns == sft_stamp
    assert (work / "ppo" / "iter_1" / "metrics.json").read_text() == iter_1
    assert result["rl_iterations"] == 2 and "mp_30/category_rate_correct" in result
    # the test answers are saved per task: a rerun of the finished stage's work needs no model at all
    assert {p.name for p in (work / "test" / "ppo_2").iterdir()} >= {"seqrec.json", "plus_c.json", "minus_c.json"}


@pytest.mark.parametrize("params, field", [
    ({"algorithm": "dqn"}, "algorithm"),
    ({"reward": "dense"}, "reward"),
    ({"test_tasks": ["seqrec", "zz_30"]}, "test_tasks"),
    ({"sft_tasks": ["chat"]}, "sft_tasks"),
    ({"rl_iterations": 0}, "rl_iterations"),
    ({"ppo": {"kl_coef": -1}}, "kl_coef"),
])
def test_bad_params_are_config_errors_naming_the_field(params, field):
    stage = {"name": "bad", "kind": "controllable", "params": {"teacher": "pop", **params}}
    with pytest.raises(ConfigError, match=field):
        _recipe([stage])


def test_an_unknown_teacher_or_init_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="init_from"):
        _recipe([{"name": "x", "kind": "controllable", "params": {"teacher": "pop", "init_from": "nope"}}])
    with pytest.raises(ConfigError, match="teacher"):
        _recipe([{"name": "x", "kind": "controllable", "params": {"teacher": "x"}}])  # itself: not earlier


def test_ppo_minibatch_rows_keep_padding_positions_inside_their_trimmed_width():
    """Regression (found by the SmolLM2 run): a long prompt with a short answer beside a short prompt with a long
    answer; a mini-batch of the two is trimmed to width 5, so padding steps must not point past it."""
    from recalign.methods.reclmgen.ppo import pack_rollouts

    rollouts = pack_rollouts([[1, 2, 3], [4], [1] * 10], [[5], [6, 7, 8, 9], [5]], pad_id=0)
    part = rollouts.rows(torch.tensor([0, 1]))
    assert part.input_ids.shape == (2, 5)
    assert part.positions.tolist() == [[2, 3, 4, 4], [0, 1, 2, 3]]  # row 0's real token at 2, padding clamped
    assert part.tokens.tolist() == [[5, 0, 0, 0], [6, 7, 8, 9]]
