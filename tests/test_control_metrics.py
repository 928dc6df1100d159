"""RecLM-gen's §5.6 metrics on a hand-made 3-user example (every row counts, the empty answer too)."""

from __future__ import annotations

import math

import pytest
import torch

from recalign.errors import ConfigError
from recalign.methods.reclmgen.metrics import CategoryTable, control_inputs, score_control
from recalign.eval.lists import NO_ENTRY as E
from recalign.eval.lists import NOT_GROUNDED as X
from recalign.eval.lists import score_lists

# Items 0..7; A = {0, 1, 2, 7}, B = {2, 3, 4}, C = {5, 6}.
CATS = CategoryTable.from_item_categories([["A"], ["A"], ["A", "B"], ["B"], ["B"], ["C"], ["C"], ["A"]])
A, B = CATS.index("A"), CATS.index("B")

# Row 0: k 3, answer [unknown, 1, 2, 1] (4 titles), target 2, history [1], C = A, MP m = 1, candidates [1, 2, 4].
# Row 1: k 3, empty answer, target 3, history [3], C = A, LP m = 1, candidates [3, 5].
# Row 2: k 4 (ItemCount), answer [3, 5, 3, 6] (4 titles), target 5, history [6, 4], C = B, EP m = 0.
GROUNDED = torch.tensor([[X, 1, 2, 1, E], [E, E, E, E, E], [3, 5, 3, 6, E]])


def inputs(**overrides):
    fields = dict(n_outputs=[4, 0, 4], history=[[1], [3], [6, 4]], categories=CATS, row_category=[A, A, B],
                  rule=["MP", "LP", "EP"], m=[1, 1, 0], sr_grounded=torch.tensor([[0, 3, 7, E], [2, 2, X, E],
                                                                                    [3, 4, 2, 0]]),
                  candidates=[[1, 2, 4], [3, 5], [3, 5, 6, 7]])
    fields.update(overrides)
    return control_inputs(GROUNDED, [2, 3, 5], [3, 3, 4], 8, **fields)


def test_every_metric_on_three_rows():
    out = score_control(inputs())
    assert out["n_rows"] == 3  # the empty answer is kept
    # L_u: row 0 [1, 2] (target at 1), row 1 [], row 2 [3, 5, 6] (target at 1).
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["mrr"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    assert out["ndcg"] == pytest.approx((1 / math.log2(3) + 0 + 1 / math.log2(3)) / 3)
    assert out["non_exist"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert out["repeat"] == pytest.approx((0 + 0 + 1 / 4) / 3)     # row 0's repeat sits past k
    assert out["in_history"] == pytest.approx((1 / 3 + 0 + 1 / 4) / 3)
    assert out["correct_count"] == pytest.approx(1 / 3)            # only row 2 wrote exactly k titles
    assert out["target_category_rate"] == pytest.approx((2 / 3 + 0 + 2 / 4) / 3)  # item 2 is in A and in B
    assert out["sr_target_category_rate"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    # MP n_in 2 >= 1 yes; LP (empty) 0 + 0 <= 1 yes; EP |2 - 0| <= 1 no.
    assert out["category_rate_correct"] == pytest.approx(2 / 3)
    assert out["not_in_candidate"] == pytest.approx((1 / 3 + 0 + 0) / 3)  # the unknown title is no candidate
    assert out["valid_ratio"] == pytest.approx(2 / 3)


def test_lp_counts_non_existent_titles_and_ep_allows_one_off():
    out = score_control(inputs(rule=["LP", "MP", "EP"], m=[2, 1, 1]))
    # LP row 0: n_in 2 + n_ne 1 = 3 > 2 no; MP row 1: 0 >= 1 no; EP row 2: |2 - 1| <= 1 yes.
    assert out["category_rate_correct"] == pytest.approx(1 / 3)


def test_rows_without_a_rule_are_not_in_category_rate_correct():
    out = score_control(inputs(rule=[None, None, "EP"], m=[0, 0, 2]))
    assert out["category_rate_correct"] == pytest.approx(1.0)
    assert "category_rate_correct" not in score_control(inputs(rule=None, m=None))


def test_reclmgen_parity_uses_positions_in_the_truncated_answer():
    out = score_control(inputs(parity="reclmgen"))
    assert out["mrr"] == pytest.approx((1 / 3 + 0 + 1 / 2) / 3)  # row 0's target is third in l_u
    assert out["ndcg"] == pytest.approx((1 / 2 + 0 + 1 / math.log2(3)) / 3)
    with pytest.raises(ConfigError, match="parity"):
        inputs(parity="daisy")


def test_bootstrap_take_keeps_rows_aligned():
    taken = inputs().take([2, 2, 1])
    out = score_lists(taken, ks=(4,), metrics=("control",))
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["target_category_rate"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert out["correct_count"] == pytest.approx(2 / 3)


def test_control_metrics_run_only_with_control_inputs():
    from recalign.eval.lists import ListInputs

    plain = score_lists(ListInputs(torch.tensor([[1, 2]]), torch.tensor([2]), 8), ks=(2,))
    assert "target_category_rate" not in plain and "recall@2" in plain


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="rule"):
        inputs(rule=["XP", "LP", "EP"])
    with pytest.raises(ConfigError, match="category table"):
        control_inputs(GROUNDED, [2, 3, 5], 3, 8, row_category=[0, 0, 0])
    with pytest.raises(ConfigError, match="k >= 1"):
        control_inputs(GROUNDED, [2, 3, 5], 0, 8)


def test_category_table_membership():
    assert CATS.names == ("A", "B", "C")
    assert CATS.sizes().tolist() == [4, 3, 2]
    hit = CATS.contains(torch.tensor([[2, 3, -1], [2, 5, 0]]), torch.tensor([A, -1]))
    assert hit.tolist() == [[True, False, False], [False, False, False]]
    with pytest.raises(ConfigError, match="unknown category"):
        CATS.index("Z")
