"""Metrics against hand-computed values (reference/metrics.md §2.1, §2.3, §4 daisy parity)."""

import math

import pytest
import torch

from recalign.errors import ConfigError
from recalign.eval import beyond
from recalign.eval.metrics import (hit_ratio, map_at_k, mrr, ndcg, precision, ranking_metrics, recall)
from recalign.eval.ranking import topk_items

L2 = 1 / math.log2(3)  # discount at position 2
L4 = 1 / math.log2(5)  # discount at position 4

# Single target: user0 target 1 at rank 2; user1 target 5 at rank 1 (list has an empty slot);
# user2 target 0 is not in the list.
LISTS = torch.tensor([[3, 1, 2], [5, 4, -1], [7, 8, 9]])
TARGETS = torch.tensor([1, 5, 0])


def close(value, expected):
    return float(value) == pytest.approx(expected, abs=1e-12)


def test_single_target_at_k1_and_k2():
    # K=1: only user1 hits at position 1 -> every metric is 1/3
    for fn in (hit_ratio, recall, precision, ndcg, mrr, map_at_k):
        assert close(fn(LISTS, TARGETS, 1), 1 / 3)
    # K=2: hits user0 @2, user1 @1
    assert close(hit_ratio(LISTS, TARGETS, 2), 2 / 3)
    assert close(recall(LISTS, TARGETS, 2), 2 / 3)
    assert close(precision(LISTS, TARGETS, 2), (1 / 2 + 1 / 2 + 0) / 3)
    assert close(ndcg(LISTS, TARGETS, 2), (L2 + 1 + 0) / 3)           # 1/log2(2+1), 1/log2(1+1)
    assert close(mrr(LISTS, TARGETS, 2), (1 / 2 + 1 + 0) / 3)


def test_k_larger_than_list_counts_missing_slots_as_misses():
    # K=5 > width 3: precision divides by K=5 -> (1/5 + 1/5 + 0) / 3
    assert close(precision(LISTS, TARGETS, 5), 2 / 15)
    assert close(hit_ratio(LISTS, TARGETS, 5), 2 / 3)
    assert close(ndcg(LISTS, TARGETS, 5), (L2 + 1) / 3)
    # AP: user0 P@2 * 1 / min(1, 5) = 1/2; user1 1; user2 0
    assert close(map_at_k(LISTS, TARGETS, 5), 0.5)


def test_per_user_values():
    assert ndcg(LISTS, TARGETS, 3, reduce="none").tolist() == pytest.approx([L2, 1.0, 0.0])
    assert mrr(LISTS, TARGETS, 3, reduce="none").tolist() == pytest.approx([0.5, 1.0, 0.0])


# Multiple relevant items: hits at positions 2 and 4; item 99 is relevant but never retrieved (|Rel| = 3).
MULTI = torch.tensor([[10, 11, 12, 13, 14]])
REL = [{11, 13, 99}]


def test_multiple_relevant_standard():
    assert close(recall(MULTI, REL, 5), 2 / 3)
    assert close(precision(MULTI, REL, 5), 2 / 5)
    assert close(hit_ratio(MULTI, REL, 5), 1.0)
    # DCG = 1/log2(3) + 1/log2(5); IDCG over min(|Rel|=3, 5) = 1 + 1/log2(3) + 1/log2(4)
    assert close(ndcg(MULTI, REL, 5), (L2 + L4) / (1 + L2 + 0.5))
    assert close(mrr(MULTI, REL, 5), 1 / 2)                     # first hit only
    assert close(map_at_k(MULTI, REL, 5), (1 / 2 + 2 / 4) / 3)  # (P@2 + P@4) / min(3, 5)
    # K=2: one hit at 2; IDCG over min(3, 2) = 2 positions; AP divides by min(3, 2) = 2
    assert close(recall(MULTI, REL, 2), 1 / 3)
    assert close(ndcg(MULTI, REL, 2), L2 / (1 + L2))
    assert close(map_at_k(MULTI, REL, 2), (1 / 2) / 2)


def test_multiple_relevant_daisy_parity():
    # IDCG over the h=2 hits re-sorted: 1 + 1/log2(3)
    assert close(ndcg(MULTI, REL, 5, parity="daisy"), (L2 + L4) / (1 + L2))
    assert close(mrr(MULTI, REL, 5, parity="daisy"), 1 / 2 + 1 / 4)      # every hit counts
    assert close(map_at_k(MULTI, REL, 5, parity="daisy"), (1 / 2 + 2 / 4) / 5)  # divided by K
    # all hits at the top -> daisy NDCG is 1 although a relevant item is missing (the inflation §4 names)
    assert close(ndcg(torch.tensor([[11, 13, 12]]), REL, 3, parity="daisy"), 1.0)
    assert close(ndcg(torch.tensor([[11, 13, 12]]), REL, 3), (1 + L2) / (1 + L2 + 0.5))
    with pytest.raises(ConfigError):
        ndcg(MULTI, REL, 5, parity="nope")


def test_padded_tensor_relevance_equals_sets():
    padded = torch.tensor([[13, 99, 11, -1]])
    for fn in (recall, ndcg, map_at_k):
        assert close(fn(MULTI, padded, 5), float(fn(MULTI, REL, 5)))


def test_repeated_items_count_once_and_empty_slots_never_hit():
    lists = torch.tensor([[11, 11, 13], [-1, -1, -1]])
    rel = [{11, 13}, {4}]
    # user0: hits at 1 and 3 (the repeat at 2 is not a hit): P@3 = 2/3; user1: nothing
    assert close(precision(lists, rel, 3), (2 / 3 + 0) / 2)
    assert close(ndcg(lists, rel, 3), ((1 + 0.5) / (1 + L2)) / 2)
    # a -1 target never matches a -1 slot
    assert close(hit_ratio(torch.tensor([[-1, 2]]), torch.tensor([-1]), 2), 0.0)


def test_boolean_hit_matrix_input():
    hits = torch.tensor([[False, True, False, True, False]])
    assert close(recall(MULTI, hits, 5, n_relevant=torch.tensor([3])), 2 / 3)
    assert close(ndcg(MULTI, hits, 5, n_relevant=torch.tensor([3])), (L2 + L4) / (1 + L2 + 0.5))


def test_ties_are_broken_by_item_id_before_metrics():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    lists, _ = topk_items(scores, 3)
    assert lists.tolist() == [[1, 3, 0]]  # 0.9 ties: 1 before 3; 0.5 ties at the cut: 0 beats 2
    assert close(ndcg(lists, torch.tensor([3]), 3), L2)
    assert close(hit_ratio(lists, torch.tensor([2]), 3), 0.0)


def test_ranking_metrics_keys_and_consistency():
    out = ranking_metrics(LISTS, TARGETS, ks=(1, 2))
    assert set(out) == {f"{m}@{k}" for m in ("hr", "recall", "precision", "ndcg", "mrr", "map") for k in (1, 2)}
    assert out["ndcg@2"] == pytest.approx((L2 + 1) / 3)
    assert out["precision@1"] == pytest.approx(1 / 3)
    multi = ranking_metrics(MULTI, REL, ks=(5,), parity="daisy")
    assert multi["mrr@5"] == pytest.approx(0.75) and multi["recall@5"] == pytest.approx(2 / 3)


# ---- beyond accuracy ---------------------------------------------------------------------------------

BLISTS = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 4, -1]])


def test_coverage_divratio_orratio():
    # K=2: lists {0,1}, {0,1}, {0,4}; union {0,1,4}; c0=3, c1=2, c4=1
    assert beyond.coverage(BLISTS, 2, 10) == pytest.approx(3 / 10)
    assert beyond.div_ratio(BLISTS, 2) == pytest.approx(3 / 6)
    assert beyond.or_ratio(BLISTS, 2, 10) == pytest.approx((3 + 2 + 1) / 6)
    # K=3: union {0,1,2,3,4}; c = 3,2,1,1,1 -> top-3 sum 6; the empty slot still counts in |U|*K = 9
    assert beyond.coverage(BLISTS, 3, 10) == pytest.approx(5 / 10)
    assert beyond.div_ratio(BLISTS, 3) == pytest.approx(5 / 9)
    assert beyond.or_ratio(BLISTS, 3, 10) == pytest.approx(6 / 9)
    assert beyond.item_counts(BLISTS, 3, 6).tolist() == [3, 2, 1, 1, 1, 0]


def test_avg_popularity():
    pop = beyond.popularity([0] * 10 + [1] * 5 + [2] + [4] * 2, 10)  # pop = 10, 5, 1, 0, 2, 0...
    assert pop[:5].tolist() == [10, 5, 1, 0, 2]
    # K=2: (10+5)/2, (10+5)/2, (10+2)/2 -> mean 7
    assert beyond.avg_popularity(BLISTS, 2, pop) == pytest.approx(7.0)
    # K=3: 16/3, 15/3, 12/3 (the empty slot adds 0 but K stays 3) -> 43/9
    assert beyond.avg_popularity(BLISTS, 3, pop) == pytest.approx(43 / 9)


def test_mgu_dgu_hand_example():
    genres = ["A", "B", "C"]
    item_genres = [["A"], ["A", "B"], ["C", "Z"], [], ["B"]]  # Z is untracked: item 2 gives C its full weight
    weights = beyond.genre_weights(item_genres, genres)
    assert weights.tolist() == [[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]]
    # GH over history 0,0,2,3: A=2, C=1 -> [2/3, 0, 1/3]
    # GP over lists {1,4},{0,3}: A=0.5+1, B=0.5+1 -> [1/2, 1/2, 0]
    # d = [-1/6, 1/2, -1/3]: MGU = (1/6 + 1/2 + 1/3)/3 = 1/3; DGU = 1/2 + 1/3 = 5/6
    mgu, dgu = beyond.mgu_dgu(torch.tensor([[1, 4, 2], [0, 3, 2]]), 2, [0, 0, 2, 3], item_genres, genres)
    assert mgu == pytest.approx(1 / 3) and dgu == pytest.approx(5 / 6)
