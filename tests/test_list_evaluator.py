"""The one list evaluator (recalign.eval.lists): list path = score path, empty answers count, seeded users, parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recalign.data.sources import prepare_source
from recalign.data.split import leave_one_out_split
from recalign.errors import ConfigError, DataError
from recalign.eval.evaluate import eval_users, evaluate
from recalign.eval.lists import (LIST_METRICS, GeneratedLists, ListInputs, ListRecommender, TopKLists, list_metric,
                                 score_lists)
from recalign.teachers.bprmf import BPRMF
from recalign.teachers.popularity import Popularity

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

KS = (1, 5, 10, 20)
L3 = 1 / math.log2(3)


@pytest.fixture(scope="module")
def synthetic():
    dataset = prepare_source("synthetic", None, n_users=120, n_items=80, seed=3)
    split = leave_one_out_split(dataset)
    return dataset, split


@pytest.fixture(scope="module")
def teachers(synthetic):
    dataset, split = synthetic
    return {"popularity": Popularity().fit(dataset, split.train, progress=False),
            "bprmf": BPRMF(dim=8, epochs=3, batch_size=256, lr=1e-2).fit(dataset, split.train, progress=False)}


# ---- acceptance 3: the list path gives the score path's numbers ------------------------------------------------

@pytest.mark.parametrize("name", ["popularity", "bprmf"])
def test_teacher_top_k_through_the_list_path_equals_the_score_path(synthetic, teachers, name):
    dataset, split = synthetic
    scored = evaluate(teachers[name], dataset, split, ks=KS, progress=False)
    listed = evaluate(TopKLists(teachers[name]), dataset, split, ks=KS, progress=False)
    assert (scored["ranking"], listed["ranking"]) == ("scores", "lists")
    assert isinstance(TopKLists(teachers[name]), ListRecommender)
    metric_keys = [key for key in scored if "@" in key]
    assert len(metric_keys) == 12 * len(KS)  # 6 accuracy; coverage, div/or ratio; avg_pop; mgu, dgu at every K
    assert {key: listed[key] for key in metric_keys} == {key: scored[key] for key in metric_keys}
    assert listed["n_users"] == scored["n_users"] == dataset.n_users and listed["valid_ratio"] == 1.0


class FixedLists:
    """A list model answering fixed lists per user (row = user id); -1 = empty slot."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def recommend(self, users, histories, k):
        return self.table[torch.as_tensor(users)][:, :k]


def test_empty_answer_lowers_hr_instead_of_being_dropped(synthetic):
    dataset, split = synthetic
    targets = torch.from_numpy(split.test.sort_values("user_id")["item_id"].to_numpy().copy())  # one per user
    perfect = torch.full((dataset.n_users, 3), -1, dtype=torch.long)
    perfect[:, 0] = targets
    full = evaluate(FixedLists(perfect), dataset, split, ks=(1, 3), progress=False)
    assert full["hr@1"] == 1.0 and full["valid_ratio"] == 1.0
    silent = perfect.clone()
    silent[:30] = -1  # 30 of 120 users get an empty answer: a miss each, still in U
    out = evaluate(FixedLists(silent), dataset, split, ks=(1, 3), progress=False)
    assert out["n_users"] == 120 and out["n_rows"] == 120
    assert out["hr@1"] == pytest.approx(90 / 120) and out["ndcg@3"] == pytest.approx(90 / 120)
    assert out["valid_ratio"] == pytest.approx(90 / 120)


def test_generated_answers_score_validity_through_evaluate(synthetic):
    dataset, split = synthetic

    class Generator:
        def recommend(self, users, histories, k):
            grounded = torch.full((len(users), 2), -2, dtype=torch.long)
            grounded[:, 0] = -1  # every answer names one title that is not in the catalog
            return GeneratedLists(grounded, torch.ones(len(users), dtype=torch.long))

    out = evaluate(Generator(), dataset, split, ks=(1, 2), progress=False)
    # k = 2: one unknown title per row -> NonExist 1/2; one title instead of two -> CorrectCount 0
    assert out["hr@2"] == 0.0 and out["valid_ratio"] == 0.0 and out["n_rows"] == dataset.n_users
    assert out["non_exist"] == pytest.approx(0.5) and out["correct_count"] == 0.0 and out["repeat"] == 0.0


def test_list_models_cannot_use_the_sampled_protocol(synthetic):
    dataset, split = synthetic
    with pytest.raises(ConfigError, match="list model"):
        evaluate(FixedLists(torch.zeros((dataset.n_users, 1), dtype=torch.long)), dataset, split, protocol="sampled",
                 progress=False)


# ---- the seeded user subset ----------------------------------------------------------------------------------

def test_seeded_user_subset_is_shared_by_list_and_score_models(synthetic, teachers):
    dataset, split = synthetic
    eligible = np.arange(dataset.n_users)
    first, again = eval_users(eligible, 25, seed=7), eval_users(eligible, 25, seed=7)
    assert np.array_equal(first, again) and len(np.unique(first)) == 25 and np.all(np.diff(first) > 0)
    assert not np.array_equal(first, eval_users(eligible, 25, seed=8))
    assert np.array_equal(eval_users(eligible, 500, seed=7), eligible)  # more than there are: everyone
    model = teachers["popularity"]
    scored = evaluate(model, dataset, split, ks=(5,), n_users=25, seed=7, progress=False)
    listed = evaluate(TopKLists(model), dataset, split, ks=(5,), n_users=25, seed=7, progress=False)
    explicit = evaluate(model, dataset, split, ks=(5,), users=first, progress=False)
    assert scored["n_users"] == 25 and scored["n_eligible"] == dataset.n_users
    for key in ("hr@5", "ndcg@5", "div_ratio@5", "mgu@5", "avg_pop@5"):
        assert scored[key] == listed[key] == explicit[key]
    # the subset's HR equals the mean of the per-user hits of the full run on exactly those users
    lists, _ = model.recommend(first, dataset.sequences(split.history("test")), 5)
    targets = torch.from_numpy(split.test.set_index("user_id").loc[first, "item_id"].to_numpy().copy())
    assert scored["hr@5"] == pytest.approx(float((lists == targets[:, None]).any(1).double().mean()))


def test_requested_users_without_a_target_are_an_error(synthetic, teachers):
    dataset, split = synthetic
    with pytest.raises(DataError, match="no target"):
        evaluate(teachers["popularity"], dataset, split, users=[0, dataset.n_users + 5], progress=False)
    with pytest.raises(ConfigError, match="eval.users"):
        evaluate(teachers["popularity"], dataset, split, n_users=0, progress=False)


# ---- parity on fixed answers: SPRec (sprec_rows) and llm-sft (llm_generated) ------------------------------------

TITLES = ["Alpha", "Beta", "Gamma", "Delta"]
# A 1-D "embedding": L2 distance between titles is the distance between these positions.
POSITION = {"Alpha": 0.0, "Beta": 1.0, "Gamma": 3.0, "Delta": 6.0, "Gammma": 2.9}
ANSWERS = ['"Beta"', 'Sure, "Gammma"', "", '"Delta"']
TARGETS = [0, 2, 3, 1]
HISTORIES = [[2], [0, 1], [3], [0]]
POPULARITY = torch.tensor([5, 3, 1, 0])
GENRES = [["x"], ["y"], ["x", "y"], []]


def _embedding_grounder():
    from recalign.llm.grounding import EmbeddingGrounder

    return EmbeddingGrounder(TITLES, normalize=False,
                             encoder=lambda titles: np.array([[POSITION.get(t, 100.0)] for t in titles]))


def test_sprec_rows_parity_metrics_on_fixed_answers():
    from recalign.llm.grounding import extract_title
    from recalign.methods.sprec.algorithm import sprec_list_metrics

    # SPRec: the first quoted title, its K nearest catalog titles. Distances from 1.0: A 1, B 0, G 2, D 5 ->
    # [Beta, Alpha]; from 2.9: G .1, B 1.9, A 2.9 -> [Gamma, Beta]; "" -> nothing; from 6: [Delta, Gamma].
    lists = _embedding_grounder().topk([extract_title(a) for a in ANSWERS], 2)
    assert lists.tolist() == [[1, 0], [2, 1], [-1, -1], [3, 2]]
    m = sprec_list_metrics(lists, torch.tensor(TARGETS), HISTORIES, [1, 2], POPULARITY, GENRES, ["x", "y"])
    # targets 0, 2, 3, 1: rank 2, rank 1, empty answer (a miss that counts), miss
    assert m["n_rows"] == 4 and m["valid_ratio"] == pytest.approx(3 / 4)
    assert m["hr@1"] == pytest.approx(1 / 4) and m["hr@2"] == pytest.approx(2 / 4)
    assert m["ndcg@1"] == pytest.approx(1 / 4) and m["ndcg@2"] == pytest.approx((L3 + 1) / 4)
    assert m["mrr@2"] == pytest.approx((1 / 2 + 1) / 4)
    # K = 2: distinct {0,1,2,3} over 4·2 slots; c = (1, 2, 2, 1) -> the 3 largest take 5 of 8 slots
    assert m["div_ratio@2"] == pytest.approx(4 / 8) and m["or_ratio@2"] == pytest.approx(5 / 8)
    # K = 1: items 1, 2, 3 once each over 4 slots
    assert m["div_ratio@1"] == pytest.approx(3 / 4) and m["or_ratio@1"] == pytest.approx(3 / 4)
    # AvgPop@2: (3+5)/2, (1+3)/2, 0, (0+1)/2 -> 6.5 / 4; @1: 3, 1, 0, 0 -> 4 / 4
    assert m["avg_pop@2"] == pytest.approx(6.5 / 4) and m["avg_pop@1"] == pytest.approx(1.0)
    # GH over 2 | 0, 1 | 3 | 0: x = .5+1+1 = 2.5, y = .5+1 = 1.5 -> (.625, .375)
    # GP@2 over 1,0 | 2,1 | 3,2: x = 1+.5+.5 = 2, y = 1+.5+1+.5 = 3 -> (.4, .6); d = (-.225, .225)
    assert m["mgu@2"] == pytest.approx(0.225) and m["dgu@2"] == pytest.approx(0.45)
    # GP@1 over 1, 2, 3: x = .5, y = 1.5 -> (.25, .75); d = (-.375, .375)
    assert m["mgu@1"] == pytest.approx(0.375) and m["dgu@1"] == pytest.approx(0.75)
    # the same numbers straight from the list evaluator (SPRec's sprec_list_metrics is only a call to it)
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    direct = score_lists(ListInputs(lists, TARGETS, 4, popularity=POPULARITY, history=HISTORIES, genre_table=table),
                         [1, 2])
    assert direct == m


def test_llm_sft_one_title_parity_metrics_on_fixed_answers():
    from recalign.llm.answers import evaluate_answers
    from recalign.llm.tasks import Rows, SeqRecTask

    rows = Rows(np.arange(4), HISTORIES, np.array(TARGETS))
    m, lists = evaluate_answers(ANSWERS, rows, TITLES, _embedding_grounder(), (1, 2), SeqRecTask())
    assert lists.tolist() == [[1, 0], [2, 1], [-1, -1], [3, 2]]  # as for SPRec: the nearest titles
    assert m["hr@1"] == pytest.approx(1 / 4) and m["hr@2"] == pytest.approx(2 / 4)
    assert m["ndcg@2"] == pytest.approx((L3 + 1) / 4) and m["mrr@2"] == pytest.approx(1.5 / 4)
    # exact catalog titles: "Beta" and "Delta"; "Gammma" and the empty answer are not
    assert m["valid_title_rate"] == pytest.approx(2 / 4) and m["valid_ratio"] == pytest.approx(3 / 4)
    assert m["n_rows"] == 4


def test_llm_sft_list_answers_parity_metrics_on_fixed_answers():
    from recalign.llm.grounding import ExactGrounder
    from recalign.llm.answers import evaluate_answers
    from recalign.llm.tasks import Rows, SeqRecTask

    rows = Rows(np.arange(4), HISTORIES, np.array(TARGETS))
    answers = ['1. "Beta"\n2. "Alpha"', '1. "Gamma"\n2. "Gamma"\n3. "Alpha"', "", '1. "Nothing"\n2. "Alpha"']
    m, lists = evaluate_answers(answers, rows, TITLES, ExactGrounder(TITLES), (1, 2), SeqRecTask(k=2))
    # grounded [1, 0] | [2, 2] (3 titles) | nothing | [unknown, 0] -> final lists [1, 0] | [2] | [] | [0]
    assert lists.tolist() == [[1, 0], [2, -1], [-1, -1], [0, -1]]
    assert m["hr@1"] == pytest.approx(1 / 4) and m["hr@2"] == pytest.approx(2 / 4)
    assert m["ndcg@2"] == pytest.approx((L3 + 1) / 4) and m["mrr@2"] == pytest.approx(1.5 / 4)
    assert m["valid_ratio"] == pytest.approx(3 / 4)  # the empty answer is invalid and still counts
    # per row over k = 2: NonExist row 3 (1/2); Repeat row 1 (1/2); InHistory row 3 (item 0 in [0]) (1/2)
    assert m["non_exist"] == pytest.approx(1 / 8) and m["repeat"] == pytest.approx(1 / 8)
    assert m["in_history"] == pytest.approx(1 / 8)
    assert m["correct_count"] == pytest.approx(2 / 4)  # rows 0 and 3 name exactly 2 titles (row 1 names 3)
    assert m["n_rows"] == 4 and m["k_generated"] == 2


# ---- the registry ------------------------------------------------------------------------------------------------

def test_a_registered_metric_runs_only_when_its_inputs_are_given():
    @list_metric("first_is_target_category", needs=("row_category", "item_category"))
    def _first(x, ks):
        first = x.lists[:, 0]
        hit = (first >= 0) & (x.extra["item_category"][first.clamp(min=0)] == x.extra["row_category"])
        return {"first_in_category": float(hit.double().mean())}

    try:
        lists, targets = torch.tensor([[0, 1], [2, -1], [-1, -1]]), torch.tensor([1, 2, 0])
        plain = score_lists(ListInputs(lists, targets, 3), (2,))
        assert "first_in_category" not in plain
        extra = {"item_category": torch.tensor([0, 1, 1]), "row_category": torch.tensor([0, 0, 1])}
        inputs = ListInputs(lists, targets, 3, extra=extra)
        assert score_lists(inputs, (2,))["first_in_category"] == pytest.approx(1 / 3)  # only row 0
        # "row_" extras follow the rows of a resample: rows 1, 1 -> item 2 (category 1) vs category 0
        assert score_lists(inputs.take([1, 1]), (2,))["first_in_category"] == 0.0
        with pytest.raises(ConfigError, match="unknown list metrics"):
            score_lists(inputs, (2,), metrics=["nope"])
    finally:
        LIST_METRICS.pop("first_is_target_category")


def test_an_llm_is_a_list_model_for_evaluate(synthetic):
    from recalign.llm.grounding import ExactGrounder
    from recalign.llm.answers import AnswerLists
    from recalign.llm.tasks import SeqRecTask

    dataset, split = synthetic
    titles = dataset.titles()
    target = dict(zip(split.test["user_id"], split.test["item_id"]))
    history = dataset.sequences(split.history("test"))
    seen = {}

    class ScriptedLLM(AnswerLists):
        """Generation replaced by a script: the target's title, except an empty answer for every 4th user."""

        def answers(self, rows):
            seen.update(zip(rows.users.tolist(), rows.histories))
            return ["" if u % 4 == 0 else f'Sure: "{titles[target[u]]}"' for u in rows.users]

    llm = ScriptedLLM(None, None, SeqRecTask(max_history=5), titles, ExactGrounder(titles))
    out = evaluate(llm, dataset, split, ks=(1, 5), progress=False)
    assert out["ranking"] == "lists" and out["n_users"] == 120
    assert out["hr@1"] == pytest.approx(90 / 120) and out["valid_ratio"] == pytest.approx(90 / 120)
    assert seen[7] == history[7][-5:].tolist()  # the prompt holds the last 5 history items
    assert len(llm.answers_) == 120 and llm.answers_[0] == ""
