"""Item codes contract, FSQ index arithmetic and the item tokenizer (small random embeddings, no MiniLM)."""

from __future__ import annotations

import pytest
import torch

from recalign.errors import DataError
from recalign.methods.recgpt.codes import ItemCodes, collision_rate, disambiguate

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


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


# ---- FSQ index arithmetic --------------------------------------------------------------------------------

def _fsq():
    from vector_quantize_pytorch import FSQ

    from recalign.methods.recgpt.fsq import FSQ_LEVELS

    return FSQ(levels=list(FSQ_LEVELS))  # dim 5: no projection, so the latent is the input


def test_fsq_basis_and_codebook_size_by_hand():
    from recalign.methods.recgpt.fsq import FSQ_LEVELS, fsq_basis

    assert fsq_basis(FSQ_LEVELS).tolist() == [1, 8, 64, 512, 3072]
    from recalign.methods.recgpt.fsq import ItemTokenizer

    assert ItemTokenizer().codebook_size == 8 * 8 * 8 * 6 * 5 == 15360


def test_fsq_index_of_extreme_and_zero_latents_by_hand():
    fsq = _fsq()
    z = torch.tensor([[[100.0] * 5], [[-100.0] * 5], [[0.0] * 5]])
    _, idx = fsq(z)
    # +inf -> top level of every digit: 7 + 7*8 + 7*64 + 5*512 + 4*3072 = 15359 (the last index)
    # -inf -> digit 0 everywhere -> 0
    # 0 -> the centre digit floor(L/2) = (4, 4, 4, 3, 2): 4 + 32 + 256 + 1536 + 6144 = 7972
    assert idx.flatten().tolist() == [15359, 0, 7972]


def test_fsq_digits_of_an_index_by_hand():
    fsq = _fsq()
    # digits (7, 0, 3, 5, 4): 7 + 0*8 + 3*64 + 5*512 + 4*3072 = 15047
    assert fsq.indices_to_level_indices(torch.tensor([15047])).tolist() == [[7, 0, 3, 5, 4]]
    codes = fsq.indices_to_codes(torch.tensor([15047]))  # digit d -> (d - floor(L/2)) / floor(L/2)
    assert codes[0].tolist() == pytest.approx([3 / 4, -1.0, -1 / 4, 2 / 3, 1.0])
    assert fsq.codes_to_indices(codes).tolist() == [15047]


def test_fsq_indices_stay_in_range_for_any_latent():
    fsq = _fsq()
    z = torch.randn(2000, 1, 5, generator=torch.Generator().manual_seed(0)) * 10
    _, idx = fsq(z)
    assert int(idx.min()) >= 0 and int(idx.max()) < 15360


# ---- ItemTokenizer ---------------------------------------------------------------------------------------

def _embeddings(n: int = 300, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _small(**kw):
    from recalign.methods.recgpt.fsq import FSQConfig

    return FSQConfig(**{"hidden": 32, "epochs": 3, "batch_size": 64, **kw})


def test_every_item_gets_a_unique_code_with_duplicated_and_empty_rows():
    from recalign.methods.recgpt.fsq import ItemTokenizer

    x = _embeddings()
    x[10] = x[20] = x[30] = x[5]  # four items with the same text
    x[40:45] = 0.0  # five items whose text embedded to nothing
    codes = ItemTokenizer(_small()).fit(x).encode(x)
    assert codes.n_positions == 5 and codes.sizes[:4] == (15360,) * 4
    assert codes.is_unique()
    assert torch.equal(codes.codes[[5, 10, 20, 30], :4], codes.codes[[5] * 4, :4])  # same chunk codes ...
    assert codes.codes[[5, 10, 20, 30], 4].tolist() == [0, 1, 2, 3]  # ... told apart by the 5th position
    assert codes.sizes[4] >= 5 and codes.collision_rate >= 9 / 300
    assert int(codes.codes[:, :4].max()) < 15360 and int(codes.codes.min()) >= 0


def test_tokenizer_is_deterministic_for_a_seed_and_differs_across_seeds():
    from recalign.methods.recgpt.fsq import ItemTokenizer

    x = _embeddings()
    a = ItemTokenizer(_small(seed=3)).fit(x)
    b = ItemTokenizer(_small(seed=3)).fit(x)
    c = ItemTokenizer(_small(seed=4)).fit(x)
    assert a.history == b.history and torch.equal(a.encode(x).codes, b.encode(x).codes)
    assert not torch.equal(a.encode(x).codes, c.encode(x).codes)


def test_training_lowers_the_reconstruction_loss():
    from recalign.methods.recgpt.fsq import ItemTokenizer

    tok = ItemTokenizer(_small(epochs=8)).fit(_embeddings())
    assert tok.history[-1] < tok.history[0]


@pytest.mark.parametrize("dim", [8, 20, 96])
def test_tokenizer_works_for_any_dim_divisible_by_four(dim):
    from recalign.methods.recgpt.fsq import ItemTokenizer

    x = _embeddings(50, dim)
    assert ItemTokenizer(_small(epochs=1)).fit(x).encode(x).is_unique()


def test_tokenizer_rejects_bad_embeddings():
    from recalign.methods.recgpt.fsq import ItemTokenizer

    with pytest.raises(DataError, match="divisible by 4"):
        ItemTokenizer(_small()).fit(_embeddings(10, 30))
    bad = _embeddings(10, 8)
    bad[3, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        ItemTokenizer(_small()).fit(bad)
    fitted = ItemTokenizer(_small(epochs=1)).fit(_embeddings(10, 8))
    with pytest.raises(DataError, match="differs"):
        fitted.encode(_embeddings(10, 16))


def test_tokenizer_save_load_gives_the_same_codes(tmp_path):
    from recalign.methods.recgpt.fsq import ItemTokenizer

    x = _embeddings()
    tok = ItemTokenizer(_small()).fit(x)
    back = ItemTokenizer.load(tok.save(tmp_path / "tokenizer.safetensors"))
    assert back.settings == tok.settings and back.history == tok.history
    assert torch.equal(back.encode(x).codes, tok.encode(x).codes)


# ---- item text ---------------------------------------------------------------------------------------------

def test_item_texts_join_fields_and_give_empty_items_a_placeholder():
    import pandas as pd

    from recalign.methods.recgpt.text import item_texts

    items = pd.DataFrame({"item_id": [0, 1, 2], "original_id": ["a", "b", "c"],
                          "title": ["Red Pen", "", "Blue  Ink"], "categories": [["Office", "Pens"], [], None],
                          "text": ["Writes red.", "", "Blue Ink"]})
    assert item_texts(items) == ["Red Pen. categories: Office, Pens. Writes red.", "item b", "Blue Ink"]


def test_embed_texts_caches_float32_by_model_and_text(tmp_path):
    import numpy as np

    from recalign.methods.recgpt.text import embed_texts

    calls = []

    def encoder(texts):
        calls.append(list(texts))
        return np.arange(len(texts) * 4, dtype=np.float64).reshape(len(texts), 4)

    first = embed_texts(["a", "b"], "m", cache_dir=tmp_path, encoder=encoder)
    again = embed_texts(["a", "b"], "m", cache_dir=tmp_path, encoder=encoder)
    other = embed_texts(["a", "b"], "m2", cache_dir=tmp_path, encoder=encoder)
    assert first.dtype == np.float32 and first.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert np.array_equal(first, again) and np.array_equal(first, other)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.npy"))) == 2  # the second call read the cache
