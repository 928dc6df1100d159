"""RecGPT decoder: hybrid mask, explicit position ids, padding/batch invariance, loss masking, training."""

from __future__ import annotations

import pytest
import torch

from recalign.errors import ConfigError, DataError
from recalign.methods.recgpt.beam import CodeBeamConfig, CodeTrie, beam_search
from recalign.methods.recgpt.codes import ItemCodes
from recalign.methods.recgpt.decoder import DecoderConfig, RecGPTDecoder, hybrid_mask, pad_histories, position_ids
from recalign.methods.recgpt.training import DecoderTraining, train_decoder

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

MIN = torch.finfo(torch.float32).min

# 6 items, 3 positions with sizes (3, 3, 2): every row distinct.
CODES = ItemCodes(torch.tensor([[0, 1, 0], [1, 1, 1], [2, 0, 1], [0, 0, 0], [1, 2, 1], [2, 2, 0]]), (3, 3, 2))
HISTORIES = [[0, 1, 2], [3], [4, 0], [5, 4, 3, 2], [1, 1], [2, 5, 0, 4, 3], [3, 0]]


def tiny_decoder(text_mode: str = "whole", text_dim: int = 6) -> RecGPTDecoder:
    torch.manual_seed(0)
    config = DecoderConfig(n_layers=2, dim=16, n_heads=2, dropout=0.0, max_items=8, text_mode=text_mode)
    return RecGPTDecoder(CODES.sizes, text_dim, config).eval()


def test_hybrid_mask_two_items_of_four_positions():
    allowed = torch.tensor([
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = hybrid_mask(2, 4)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0], torch.where(allowed, 0.0, MIN))


def test_hybrid_mask_hides_padding_keys_and_keeps_the_diagonal():
    # Row 0: the first item is left padding. Real tokens never see it; padding tokens see only themselves.
    pad = torch.tensor([[True] * 4 + [False] * 4, [False] * 8])
    allowed = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    mask = hybrid_mask(2, 4, pad)
    assert mask.shape == (2, 1, 8, 8)
    assert torch.equal(mask[0, 0], torch.where(allowed, 0.0, MIN))
    assert torch.equal(mask[1, 0], hybrid_mask(2, 4)[0, 0])


def test_position_ids_count_from_the_first_real_token():
    left = torch.tensor([[True, True, False, False, False]])
    right = torch.tensor([[False, False, False, True, True]])
    assert position_ids(left).tolist() == [[0, 0, 0, 1, 2]]
    assert position_ids(right).tolist() == [[0, 1, 2, 2, 2]]


def test_vocabulary_is_codes_plus_pad_only():
    decoder = tiny_decoder()
    assert decoder.gpt.wte.weight.shape == (3 + 3 + 2 + 1, 16)
    assert decoder.pad_id == 8


@pytest.mark.parametrize("text_mode", ["whole", "chunk"])
def test_scores_do_not_depend_on_batch_size_or_padding_side(text_mode):
    decoder = tiny_decoder(text_mode)
    text = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        left = decoder.next_item_log_probs(pad_histories(HISTORIES, 8, "left"), CODES, text)
        right = decoder.next_item_log_probs(pad_histories(HISTORIES, 8, "right"), CODES, text)
        alone = torch.cat([decoder.next_item_log_probs(pad_histories([h], 8), CODES, text) for h in HISTORIES])
        # extra padding columns beyond the longest history change nothing either
        wide = torch.cat([torch.full((7, 3), -1), pad_histories(HISTORIES, 8, "left")], 1)
        wider = decoder.next_item_log_probs(wide, CODES, text)
    assert left.shape == (7, 3, 3)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, wider, atol=1e-5, rtol=0)
    # different histories do give different tables (the comparison above is not trivially true)
    assert (left[0, :2] - left[1, :2]).abs().max() > 1e-3


def test_model_attends_inside_an_item_and_causally_across_items():
    decoder = tiny_decoder()
    text = torch.randn(6, 6, generator=torch.Generator().manual_seed(6))
    text[3] = text[0]  # items 0 = (0, 1, 0) and 3 = (0, 0, 0) then differ only in their position-1 token
    with torch.no_grad():
        a = decoder(torch.tensor([[1, 0, 2]]), CODES, text)
        b = decoder(torch.tensor([[1, 3, 2]]), CODES, text)
    torch.testing.assert_close(a[0, 0], b[0, 0], atol=1e-6, rtol=0)  # item 0 cannot see the later item
    assert (a[0, 1, 0, :3] - b[0, 1, 0, :3]).abs().max() > 1e-4  # position 0 sees position 1 of its own item
    assert (a[0, 2, :, :2] - b[0, 2, :, :2]).abs().max() > 1e-5  # the next item sees the earlier one (weakly at init)


def test_text_vectors_of_the_history_items_change_the_scores():
    decoder = tiny_decoder()
    text = torch.randn(6, 6, generator=torch.Generator().manual_seed(7))
    changed = text.clone()
    changed[5] += 1.0  # item 5 is not in the history
    moved = text.clone()
    moved[1] += 1.0  # item 1 is
    history = torch.tensor([[0, 1]])
    with torch.no_grad():
        base = decoder.next_item_log_probs(history, CODES, text)
        assert torch.equal(base, decoder.next_item_log_probs(history, CODES, changed))
        assert (base - decoder.next_item_log_probs(history, CODES, moved))[:, :2].abs().max() > 1e-4


def test_log_probs_are_normalised_per_position():
    decoder = tiny_decoder()
    text = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        table = decoder.next_item_log_probs(pad_histories(HISTORIES[:2], 8), CODES, text)
    assert torch.isneginf(table[:, 2, 2]).all()  # position 2 has only 2 values
    torch.testing.assert_close(table.logsumexp(-1), torch.zeros(2, 3))


def test_loss_ignores_padding():
    decoder = tiny_decoder()
    text = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    batch = pad_histories([[0, 1, 2], [3, 4]], 8, "right")
    padded = torch.cat([batch, torch.full((2, 2), -1)], 1)
    with torch.no_grad():
        loss = decoder.loss(batch, CODES, text)
        assert torch.isclose(loss, decoder.loss(padded, CODES, text), atol=1e-6)
        # a hand-computed check: mean CE over the 3 next-item pairs x 3 positions
        logits = decoder(batch, CODES, text)
        pairs = [(0, 0, 1), (0, 1, 2), (1, 0, 4)]  # (row, step, next item)
        terms = [-torch.log_softmax(logits[r, t, j], -1)[CODES.codes[nxt, j]] for r, t, nxt in pairs for j in range(3)]
    assert torch.isclose(loss, torch.stack(terms).mean(), atol=1e-5)


def test_bad_inputs_raise_project_errors():
    with pytest.raises(ConfigError, match="chunk"):
        tiny_decoder("chunk", text_dim=7)
    decoder = tiny_decoder()
    text = torch.zeros(6, 6)
    with pytest.raises(DataError, match="no items"):
        decoder.next_item_log_probs(torch.tensor([[0, 1], [-1, -1]]), CODES, text)
    with pytest.raises(DataError, match="sizes"):
        decoder.next_item_log_probs(torch.tensor([[0]]), torch.tensor([[0, 0, 2]]), text[:1])
    with pytest.raises(ConfigError, match="max_items"):
        decoder.next_item_log_probs(torch.zeros(1, 9, dtype=torch.long), CODES, text)


def test_training_learns_item_i_is_followed_by_item_i_plus_one():
    # 12 items, codes (4 x 3) unique; every sequence walks i, i+1, i+2 ... modulo 12.
    codes = ItemCodes(torch.stack([torch.arange(12) // 3, torch.arange(12) % 3], 1), (4, 3))
    text = torch.randn(12, 8, generator=torch.Generator().manual_seed(4))
    sequences = [[(start + step) % 12 for step in range(5)] for start in range(12)] * 2
    torch.manual_seed(0)
    decoder = RecGPTDecoder(codes.sizes, 8, DecoderConfig(n_layers=1, dim=32, n_heads=2, dropout=0.0, max_items=6))
    result = train_decoder(decoder, sequences, codes, text,
                           DecoderTraining(epochs=30, batch_size=8, lr=3e-3, seed=0))
    assert len(result.step_losses) == 30 * 3 and len(result.epoch_losses) == 30
    assert result.epoch_losses[-1] < 0.25 * result.epoch_losses[0]
    histories = pad_histories([[(i - 1) % 12, i] for i in range(12)], 6)
    with torch.no_grad():
        table = decoder.next_item_log_probs(histories, codes, text)
    top = beam_search(table, CodeTrie.build(codes), CodeBeamConfig(widths=(4, 4))).items[:, 0]
    assert (top == (torch.arange(12) + 1) % 12).float().mean() >= 0.9


def test_training_is_seeded_and_rejects_unusable_data():
    text = torch.randn(6, 6, generator=torch.Generator().manual_seed(5))
    runs = []
    for _ in range(2):
        decoder = tiny_decoder()
        runs.append(train_decoder(decoder, HISTORIES, CODES, text, DecoderTraining(epochs=2, batch_size=3)).step_losses)
    assert runs[0] == runs[1]
    with pytest.raises(DataError, match="two or more"):
        train_decoder(tiny_decoder(), [[1], []], CODES, text)
    with pytest.raises(DataError, match="item ids"):
        train_decoder(tiny_decoder(), [[1, 6]], CODES, text)
