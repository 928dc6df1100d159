"""Item codes contract, FSQ index arithmetic and the item tokenizer (small random embeddings, no MiniLM)."""

from __future__ import annotations

import pytest
import torch

from recalign.errors import DataError
from recalign.genrec.codes import ItemCodes, collision_rate, disambiguate


# ---- ItemCodes -------------------------------------------------------------------------------------------

def test_item_codes_offsets_token_ids_and_pad():
    codes = ItemCodes(torch.tensor([[0, 2, 1], [3, 0, 0]]), sizes=(4, 3, 2))
    assert codes.offsets == (0, 4, 7)
    assert codes.pad_id == 9 and codes.vocab_size == 10
    assert codes.token_ids().tolist() == [[0, 6, 8], [3, 4, 7]]


def test_item_codes_rejects_values_outside_sizes():
    with pytest.raises(DataError, match="outside"):
        ItemCodes(torch.tensor([[0, 3]]), sizes=(4, 3))
    with pytest.raises(DataError, match="sizes"):
        ItemCodes(torch.tensor([[0, 1]]), sizes=(4,))


def test_disambiguate_numbers_items_sharing_a_row_in_item_order():
    base = torch.tensor([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    out = disambiguate(base, (3, 3))
    assert out.codes[:, 2].tolist() == [0, 0, 1, 2, 0]
    assert out.sizes == (3, 3, 3)  # the largest group has 3 items
    assert out.collision_rate == pytest.approx(3 / 5)
    assert out.is_unique()
    assert collision_rate(base) == pytest.approx(0.6)


def test_disambiguate_without_collisions_adds_a_size_one_position():
    out = disambiguate(torch.tensor([[0], [1]]), (2,))
    assert out.sizes == (2, 1) and out.codes[:, 1].tolist() == [0, 0] and out.collision_rate == 0.0


def test_item_codes_save_load_roundtrip(tmp_path):
    codes = disambiguate(torch.tensor([[5, 1], [5, 1], [2, 0]]), (15360, 15360))
    path = codes.save(tmp_path / "codes.safetensors")
    back = ItemCodes.load(path)
    assert torch.equal(back.codes, codes.codes)
    assert back.sizes == (15360, 15360, 2) and back.collision_rate == pytest.approx(2 / 3)


def test_item_codes_load_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "codes.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="codes.safetensors"):
        ItemCodes.load(bad)
    with pytest.raises(DataError, match="no such"):
        ItemCodes.load(tmp_path / "missing.safetensors")
