"""Tie-exact top-k, history masking, embedding fast path and candidate ranking."""

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.data.dataset import UserSequences
from recalign.eval.ranking import (_blocked_topk, full_ranking, full_ranking_topk, rank_candidates,
                                   sampled_ranking, topk_items)

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


def reference_topk(scores, k):
    """The definition: stable sort by score descending keeps ascending ids among equal scores."""
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return indices[:, :k], values[:, :k]


def history(lists, n_items):
    frame = pd.DataFrame([(u, i, t) for u, items in enumerate(lists) for t, i in enumerate(items)],
                         columns=["user_id", "item_id", "timestamp"])
    return UserSequences.from_interactions(frame, len(lists), n_items)


def test_topk_ties_inside_and_across_the_cut():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    items, values = topk_items(scores, 3)
    # row 0: 3.0 at {1, 3} then 2.0 at {2, 4, 5} -> the smallest tied id 2 takes the last slot
    # row 1: all tied -> ids 0, 1, 2; row 2: no ties
    assert items.tolist() == [[1, 3, 2], [0, 1, 2], [0, 1, 2]]
    assert values.tolist() == [[3.0, 3.0, 2.0], [0.0, 0.0, 0.0], [5.0, 4.0, 3.0]]


def test_topk_matches_stable_sort_on_tie_heavy_random_scores():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows, cols = torch.randint(1, 6, (2,), generator=gen).tolist()
        k = int(torch.randint(1, cols + 3, (1,), generator=gen))
        scores = torch.randint(0, 3, (rows, cols), generator=gen).float()
        scores[torch.rand(rows, cols, generator=gen) < 0.3] = -torch.inf
        got, want = topk_items(scores, k), reference_topk(scores, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_topk_is_deterministic_and_clips_k():
    scores = torch.zeros(4, 50)
    first = topk_items(scores, 10)[0]
    assert all(torch.equal(first, topk_items(scores, 10)[0]) for _ in range(3))
    assert first.tolist() == [list(range(10))] * 4
    assert topk_items(torch.tensor([[0.2, 0.1]]), 5)[0].tolist() == [[0, 1]]


def test_full_ranking_masks_history_and_marks_empty_slots():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]])
    hist = history([[0, 2], [0, 1, 2]], 4)
    items, values = full_ranking(lambda users: scores[torch.as_tensor(users)], [0, 1], hist, 3)
    # user0: 0 and 2 masked -> 1, 3, then nothing left; user1: only 3 left
    assert items.tolist() == [[1, 3, -1], [3, -1, -1]]
    assert values[0, :2].tolist() == pytest.approx([0.8, 0.6]) and values[0, 2] == -torch.inf
    unmasked, _ = full_ranking(lambda users: scores[torch.as_tensor(users)], [0, 1], hist, 2,
                               exclude_history=False)
    assert unmasked.tolist() == [[0, 1], [3, 2]]
    assert scores[0, 0] == 0.9  # the model's tensor is never written to


def test_embedding_path_equals_generic_path_in_chunks():
    gen = torch.Generator().manual_seed(1)
    user_emb, item_emb = torch.randn(37, 8, generator=gen), torch.randn(53, 8, generator=gen)
    rng = np.random.default_rng(0)
    hist = history([rng.choice(53, rng.integers(0, 20), replace=False).tolist() for _ in range(37)], 53)
    users = np.arange(36, -1, -1)  # any order
    fast_items, fast_values = full_ranking_topk(user_emb, item_emb, hist, users, 10, chunk=8)
    slow_items, slow_values = full_ranking(lambda u: user_emb[torch.as_tensor(u)] @ item_emb.T, users, hist,
                                           10, chunk=5)
    assert torch.equal(fast_items, slow_items)
    assert torch.allclose(fast_values, slow_values)
    for row, user in enumerate(users):
        assert not set(fast_items[row].tolist()) & set(hist[user].tolist())


def test_rank_candidates_breaks_ties_by_item_id_not_position():
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.9, 0.5, 0.0]])
    # target 4 listed first, tied at 0.5 with negatives 1 and 2: it must rank after them (ids 1 < 2 < 4)
    items, values = rank_candidates(scores, torch.tensor([[4, 1, 2, 3, -1]]))
    assert items.tolist() == [[3, 1, 2, 4, -1]]
    assert values[0, :4].tolist() == pytest.approx([0.9, 0.5, 0.5, 0.5])


def test_sampled_ranking_with_history_exclusion():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.5]])
    hist = history([[1]], 4)
    cands = torch.tensor([[1, 2, 3]])  # the target 1 repeats a history item
    kept, _ = sampled_ranking(lambda u: scores, [0], hist, cands, exclude_history=False)
    masked, _ = sampled_ranking(lambda u: scores, [0], hist, cands, exclude_history=True)
    assert kept.tolist() == [[1, 3, 2]]
    assert masked.tolist() == [[3, 2, -1]]


def test_blocked_topk_is_exact_with_ties_and_masked_rows():
    gen = torch.Generator().manual_seed(3)
    n_valid, k = 1000, 10
    scores = torch.full((64, 1024), -torch.inf)
    # few distinct values -> ties everywhere, including across block maxima and the k-th position
    scores[:, :n_valid] = torch.randint(0, 40, (64, n_valid), generator=gen).float()
    scores[5, :n_valid] = -torch.inf   # a fully masked row
    scores[6, :n_valid - 3] = -torch.inf  # only 3 items left
    scores[7, :n_valid] = torch.randn(n_valid, generator=gen)  # no ties: the pruned path alone
    got = _blocked_topk(scores, n_valid, k)
    want = reference_topk(scores[:, :n_valid], k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_embedding_path_blocked_equals_reference_with_quantised_scores():
    gen = torch.Generator().manual_seed(4)
    user_emb = torch.randint(-2, 3, (50, 4), generator=gen).float()
    item_emb = torch.randint(-2, 3, (700, 4), generator=gen).float()  # integer scores: many ties
    rng = np.random.default_rng(1)
    hist = history([rng.choice(700, rng.integers(0, 300), replace=False).tolist() for _ in range(50)], 700)
    users = np.arange(50)
    items, values = full_ranking_topk(user_emb, item_emb, hist, users, 10, chunk=16)
    scores = user_emb @ item_emb.T
    rows, cols = hist.mask_coordinates(users)
    scores[rows, cols] = -torch.inf
    want_items, want_values = reference_topk(scores, 10)
    assert torch.equal(items, want_items) and torch.equal(values, want_values)


def test_threads_option_gives_same_lists_and_restores_setting():
    gen = torch.Generator().manual_seed(5)
    user_emb, item_emb = torch.randn(20, 8, generator=gen), torch.randn(400, 8, generator=gen)
    before = torch.get_num_threads()
    one = full_ranking_topk(user_emb, item_emb, None, np.arange(20), 5, threads=1)
    default = full_ranking_topk(user_emb, item_emb, None, np.arange(20), 5)
    assert torch.equal(one[0], default[0]) and torch.get_num_threads() == before
