"""Validity metrics of generated lists (metrics.md §2.4) on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from recalign.errors import ConfigError
from recalign.eval.lists import GeneratedLists, ListInputs, category_metrics, final_lists, score_lists, validity_metrics
from recalign.llm.evaluate import ground_answers, ground_lists
from recalign.llm.grounding import ExactGrounder

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

# k = 4. Row 0: a repeat (3), an unknown title, a history item (5). Row 1: empty answer. Row 2: two titles.
# Row 3: six titles (truncated to 4), item 1 three times, history item 2.
GROUNDED = torch.tensor([[3, -1, 3, 5], [-2, -2, -2, -2], [7, 8, -2, -2], [1, 2, 1, 1]])
N_OUTPUTS = torch.tensor([4, 0, 2, 6])
HISTORY = [{5, 9}, {1}, set(), {2}]
CANDIDATES = [{3, 7}, {1, 2}, {7}, {4}]


def test_validity_metrics_hand_computed():
    m = validity_metrics(GROUNDED, n_outputs=N_OUTPUTS, history=HISTORY)
    assert m["non_exist"] == pytest.approx((1 / 4) / 4)
    assert m["repeat"] == pytest.approx((1 / 4 + 2 / 4) / 4)
    assert m["in_history"] == pytest.approx((1 / 4 + 1 / 4) / 4)
    assert m["correct_count"] == pytest.approx(1 / 4)  # only row 0 has exactly k titles
    assert m["valid_ratio"] == pytest.approx(3 / 4)  # the empty answer is invalid


def test_candidate_metrics_hand_computed():
    m = validity_metrics(GROUNDED, candidates=CANDIDATES)
    # Entries outside the candidates: row 0 the unknown title and 5; row 2: 8; row 3: all four.
    assert m["not_in_candidate"] == pytest.approx((2 / 4 + 0 + 1 / 4 + 4 / 4) / 4)
    assert m["valid_ratio"] == pytest.approx(2 / 4)  # rows 0 and 2 name a candidate
    assert "correct_count" not in m and "in_history" not in m


def test_final_lists_drop_unknown_and_repeats_keeping_order():
    assert final_lists(GROUNDED).tolist() == [[3, 5, -1, -1], [-1] * 4, [7, 8, -1, -1], [1, 2, -1, -1]]


def test_ground_lists_truncates_and_counts():
    grounder = ExactGrounder(["a", "b", "c"])
    generated = ground_lists([["A", "zz", "c", "b", "a"], [], ["b"]], grounder, k=3)
    assert generated.grounded.tolist() == [[0, -1, 2], [-2, -2, -2], [1, -2, -2]]
    assert generated.n_outputs.tolist() == [5, 0, 1]


def test_ground_answers_counts_titles_before_truncation():
    generated = ground_answers(['1. "a"\n2. "b"\n3. "c"', "", '"c"'], ExactGrounder(["a", "b", "c"]), k=2)
    assert generated.grounded.tolist() == [[0, 1], [-2, -2], [2, -2]]
    assert generated.n_outputs.tolist() == [3, 0, 1]  # CorrectCount reads the length before truncation


def test_category_metrics_rules():
    item_categories = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    grounded = torch.tensor([[0, 1, 2, -1]] * 3)
    row_category = torch.tensor([0, 0, 0])
    # n_in = 2, n_ne = 1, k = 4, p = 50 -> m = 2: LP 2 + 1 <= 2 fails, MP 2 >= 2, EP |2 - 2| <= 1.
    m = category_metrics(grounded, item_categories, row_category, p=50, rule=["LP", "MP", "EP"])
    assert m["target_category_rate"] == pytest.approx(0.5)
    assert m["category_rate_correct"] == pytest.approx(2 / 3)
    strict = category_metrics(grounded, item_categories, row_category, p=50, rule="LP", strict=True)
    assert strict["category_rate_correct"] == 1.0  # strict LP ignores non-existent titles: 2 <= 2
    ep_off_by_one = category_metrics(grounded, item_categories, row_category, p=75, rule="EP")  # m = 3
    assert ep_off_by_one["category_rate_correct"] == 1.0
    assert category_metrics(grounded, item_categories, row_category, p=75, rule="EP", strict=True)[
        "category_rate_correct"
    ] == 0.0
    with pytest.raises(ConfigError):
        category_metrics(grounded, item_categories, row_category, p=50, rule="XX")


def test_generated_lists_through_the_list_evaluator():
    targets = torch.tensor([5, 1, 8, -1])  # row 3's target is not in the catalog: removed and counted
    inputs = ListInputs.from_generated(GeneratedLists(GROUNDED, N_OUTPUTS), targets, 10, history=HISTORY)
    m = score_lists(inputs, ks=(1, 2, 4))
    assert m["n_rows"] == 3 and m["n_removed_unknown_target"] == 1 and m["k_generated"] == 4
    # Final lists: row 0 [3, 5] (target at rank 2), row 1 empty, row 2 [7, 8] (target at rank 2).
    assert m["hr@1"] == 0.0
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx(2 / 3 / math.log2(3))
    assert m["valid_ratio"] == pytest.approx(2 / 3)
    assert m["repeat"] == pytest.approx((1 / 4) / 3)


def test_category_metrics_run_inside_score_lists_when_their_inputs_are_given():
    item_categories = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    grounded = torch.tensor([[0, 1, 2, -1], [2, 3, -2, -2]])
    extra = {"item_categories": item_categories, "row_category": torch.tensor([0, 1]), "p": 50, "rule": "MP"}
    m = score_lists(ListInputs.from_generated(GeneratedLists(grounded), torch.tensor([0, 3]), 4, extra=extra), (4,))
    # row 0: 2 of 4 entries in category 0 (m = 2, MP holds); row 1: 2 of 4 in category 1 (holds)
    assert m["target_category_rate"] == pytest.approx(0.5) and m["category_rate_correct"] == 1.0
    assert "target_category_rate" not in score_lists(ListInputs.from_generated(GeneratedLists(grounded),
                                                                               torch.tensor([0, 3]), 4), (4,))
