"""Trie-constrained beam search: trie tables, hand-computed beams, catalog-only outputs, parity with the Python loop."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hyp_settings, strategies as st

from recalign.data.dataset import UserSequences
from recalign.errors import ConfigError, DataError
from recalign.eval.lists import ListRecommender
from recalign.methods.recgpt.beam import (BeamLists, CodeBeamConfig, CodeTrie, beam_search, compare_with_python_loop,
                                  history_mask, python_loop_beam)
from recalign.methods.recgpt.codes import ItemCodes
from recalign.methods.recgpt.decoder import DecoderConfig, RecGPTDecoder

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

LOG = math.log


def exhaustive(log_probs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of every catalog item for every row: [B, N]."""
    positions = torch.arange(codes.shape[1])
    return log_probs[:, positions[None, :], codes].sum(-1)


def test_trie_tables_by_hand():
    # items: 0 -> (1, 0), 1 -> (0, 1), 2 -> (1, 1)
    trie = CodeTrie.build(torch.tensor([[1, 0], [0, 1], [1, 1]]))
    assert trie.edge_code[0].tolist() == [0, 1] and trie.indptr[0].tolist() == [0, 2]
    # depth-1 prefixes are numbered in sorted order: (0,) = 0, (1,) = 1; leaves (0,1) = 0, (1,0) = 1, (1,1) = 2
    assert trie.edge_code[1].tolist() == [1, 0, 1] and trie.indptr[1].tolist() == [0, 1, 3]
    assert trie.item_of_leaf.tolist() == [1, 0, 2]
    assert trie.child(1, torch.tensor([1]), torch.tensor([1])).tolist() == [2]


def test_duplicate_code_rows_are_refused():
    with pytest.raises(DataError, match="1 items share"):
        CodeTrie.build(torch.tensor([[0, 1], [1, 0], [0, 1]]))


def test_narrow_beam_by_hand():
    # items: 0 -> (0, 0), 1 -> (0, 2), 2 -> (1, 1). Position 0 prefers code 0 (0.6), but item 2 is best:
    # item 0 = .6 * .1 = .06, item 1 = .6 * .05 = .03, item 2 = .4 * .85 = .34.
    codes = torch.tensor([[0, 0], [0, 2], [1, 1]])
    table = torch.log(torch.tensor([[[0.6, 0.4, 0.0], [0.1, 0.85, 0.05]]]))
    trie = CodeTrie.build(codes)
    # width 1 keeps only code 0 at step 0: the best of (0,0) and (0,2) is item 0 = .6 * .1
    narrow = beam_search(table, trie, CodeBeamConfig(widths=(1,), extensions=2))
    assert narrow.items.tolist() == [[0]]
    assert narrow.scores[0, 0].item() == pytest.approx(LOG(0.6) + LOG(0.1))
    # width 2 finds item 2 = .4 * .85 = .34 ahead of .06 and .03; all three survive
    wide = beam_search(table, trie, CodeBeamConfig(widths=(2, 3), extensions=2))
    assert wide.items.tolist() == [[2, 0, 1]]
    assert wide.scores[0].tolist() == pytest.approx([LOG(0.4) + LOG(0.85), LOG(0.6) + LOG(0.1),
                                                     LOG(0.6) + LOG(0.05)])
    assert wide.codes[0].tolist() == [[1, 1], [0, 0], [0, 2]]
    # one extension per beam: beam (0,) keeps only its best child (0, 0)
    one = beam_search(table, trie, CodeBeamConfig(widths=(2, 3), extensions=1))
    assert one.items.tolist() == [[2, 0]]  # at most 2 beams x 1 extension
    # excluding history item 2 leaves the next best
    seen = history_mask([[2]], 3)
    excluded = beam_search(table, trie, CodeBeamConfig(widths=(2, 3), extensions=2, exclude_history=True), seen)
    assert excluded.items.tolist() == [[0, 1, -1]]
    allowed = beam_search(table, trie, CodeBeamConfig(widths=(2, 3), extensions=2, exclude_history=False), seen)
    assert allowed.items.tolist() == [[2, 0, 1]]


@st.composite
def beam_cases(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    rows = list(itertools.product(*[range(s) for s in sizes]))
    chosen = draw(st.lists(st.sampled_from(rows), min_size=1, max_size=len(rows), unique=True))
    n_users = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 10_000))
    widths = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    extensions = draw(st.integers(1, 4))
    exclude = draw(st.booleans())
    return torch.tensor(chosen), max(sizes), n_users, seed, CodeBeamConfig(widths, extensions, exclude)


@hyp_settings(max_examples=80, deadline=None, derandomize=True)
@given(beam_cases())
def test_beam_yields_only_catalog_codes_with_their_exhaustive_scores(case):
    codes, vocab, n_users, seed, settings = case
    generator = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(torch.randn(n_users, codes.shape[1], vocab, generator=generator), -1)
    histories = [torch.randint(0, len(codes), (2,), generator=generator).tolist() for _ in range(n_users)]
    seen = history_mask(histories, len(codes))
    result = beam_search(table, CodeTrie.build(codes), settings, seen)
    full = exhaustive(table, codes)
    for user in range(n_users):
        alive = result.items[user] >= 0
        items = result.items[user][alive]
        assert ((items >= 0) & (items < len(codes))).all()
        assert torch.equal(result.codes[user][alive], codes[items])  # the decoded path is the item's catalog code
        torch.testing.assert_close(result.scores[user][alive], full[user, items])
        assert len(set(items.tolist())) == len(items)
        assert (result.scores[user][alive].diff() <= 0).all()
        if settings.exclude_history:
            assert not set(items.tolist()) & set(histories[user])
        # wide enough to see every prefix: top-1 is the exhaustive best (history excluded or not)
    wide = CodeBeamConfig((len(codes),), len(codes), settings.exclude_history)
    best = beam_search(table, CodeTrie.build(codes), wide, seen)
    masked = full.masked_fill(seen, float("-inf")) if settings.exclude_history else full
    for user in range(n_users):
        if torch.isfinite(masked[user]).any():
            assert best.scores[user, 0].item() == pytest.approx(masked[user].max().item())
            assert masked[user, best.items[user, 0]].item() == pytest.approx(masked[user].max().item())
        else:
            assert (best.items[user] == -1).all()


@pytest.mark.parametrize("exclude", [True, False])
def test_vectorised_beam_equals_the_python_loop(exclude):
    generator = torch.Generator().manual_seed(7)
    rows = torch.tensor(list(itertools.product(range(5), range(4), range(3))))
    codes = rows[torch.randperm(len(rows), generator=generator)[:40]]
    table = torch.log_softmax(torch.randn(9, 3, 5, generator=generator), -1)
    histories = [torch.randint(0, 40, (4,), generator=generator).tolist() for _ in range(9)]
    settings = CodeBeamConfig(widths=(3, 6, 5), extensions=2, exclude_history=exclude)
    fast = beam_search(table, CodeTrie.build(codes), settings, history_mask(histories, 40))
    slow = python_loop_beam(table, codes, settings, histories)
    for user in range(9):
        alive = fast.items[user] >= 0
        assert fast.items[user][alive].tolist() == [item for item, _ in slow[user]]
        assert fast.scores[user][alive].tolist() == pytest.approx([score for _, score in slow[user]])


def test_speed_comparison_reports_both_timings_and_agreement():
    generator = torch.Generator().manual_seed(8)
    codes = torch.tensor(list(itertools.product(range(6), range(6), range(2))))
    table = torch.log_softmax(torch.randn(16, 3, 6, generator=generator), -1)
    histories = [[0, 5]] * 16
    report = compare_with_python_loop(table, codes, CodeBeamConfig(widths=(4, 8), extensions=3), histories)
    assert report["users"] == 16 and report["same_items"] is True
    assert report["vectorised_s"] > 0 and report["python_loop_s"] > 0
    assert report["speedup"] == pytest.approx(report["python_loop_s"] / report["vectorised_s"])


def test_bad_settings_are_config_errors():
    table = torch.zeros(1, 1, 2)
    trie = CodeTrie.build(torch.tensor([[0], [1]]))
    for bad in [CodeBeamConfig(widths=()), CodeBeamConfig(widths=(0,)), CodeBeamConfig(extensions=0)]:
        with pytest.raises(ConfigError):
            beam_search(table, trie, bad)
    with pytest.raises(DataError, match="positions"):
        beam_search(torch.zeros(1, 2, 2), trie, CodeBeamConfig())


def test_beam_lists_is_a_list_recommender():
    codes = ItemCodes(torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]]), (3, 2))
    torch.manual_seed(0)
    decoder = RecGPTDecoder(codes.sizes, 4, DecoderConfig(n_layers=1, dim=8, n_heads=2, max_items=4))
    text = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    histories = UserSequences(indptr=np.array([0, 2, 2, 5]), items=np.array([0, 1, 2, 3, 4]), n_items=5)
    model = BeamLists(decoder, codes, text, CodeBeamConfig(widths=(3, 5), extensions=2),
                      batch_size=2)
    assert isinstance(model, ListRecommender)
    lists = model.recommend(np.array([2, 1, 0]), histories, k=4)
    assert lists.shape == (3, 4)
    assert (lists[1] == -1).all()  # user 1 has no history: a counted miss
    assert (lists[2, :3] >= 0).all() and not set(lists[2].tolist()) & {0, 1}  # 5 items - 2 seen = 3 left
    assert lists[2, 3] == -1
    assert not set(lists[0].tolist()) & {2, 3, 4} and (lists[0, 2:] == -1).all()
    # the same users one at a time give the same lists (batching changes nothing)
    alone = torch.cat([BeamLists(decoder, codes, text, model.settings, batch_size=1).recommend(
        np.array([u]), histories, k=4) for u in [2, 1, 0]])
    assert torch.equal(lists, alone)
