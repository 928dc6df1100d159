"""The fast greedy path (`recalign.llm.fastgen`): same answers as `model.generate`, the shared prompt prefix
prefilled once, rows that stop early really stop (EOS, the trie terminator, `stop_after_titles`)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from recalign.llm.constrained import CatalogTrie  # noqa: E402
from recalign.llm.fastgen import (  # noqa: E402
    DecodeConfig,
    PrefixCache,
    _forward,
    _suffix_inputs,
    shared_prefix_length,
)
from recalign.llm.generate import GenerationConfig, TrieConstraint, fast_path_applies, generate  # noqa: E402
from recalign.llm.models import tiny_model  # noqa: E402
from recalign.llm.prompts import render_prompt  # noqa: E402
from recalign.llm.tasks import parse_titles, titles_final  # noqa: E402

pytestmark = pytest.mark.fast

HISTORIES = ["Dune", "Emma, Ulysses and a much longer title with many words", "x", "Beloved, Hamlet and Walden",
             "The Name of the Rose", "Moby-Dick; or, The Whale", "It", "War and Peace, Anna Karenina"]
CATALOG = ["Dune", "Dune Messiah", "Emma", "Hamlet", "Walden", "War and Peace", "Beloved", "Ulysses"]


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama with larger weights, so different prompts get different answers and lengths."""
    model, tokenizer = tiny_model(seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model, tokenizer


def _prompts(tokenizer) -> list[str]:
    """Chat-template prompts sharing the system text and instruction, with suffixes of different lengths."""
    return [render_prompt(tokenizer, [{"role": "system", "content": "You recommend books."},
                                      {"role": "user", "content": f"Recommend one book after: {h}"}])
            for h in HISTORIES]


class _Counter:
    """Counts forward calls of a model and the tokens fed to them."""

    def __init__(self, model):
        self.calls = self.tokens = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.tokens += int(kwargs["input_ids"].numel())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_shared_prefix_keeps_one_suffix_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter prompt keeps its last token
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert shared_prefix_length([[1, 2]]) == 1


def test_prefix_reuse_gives_the_plain_logits(tiny):
    model, tokenizer = tiny
    encoded = tokenizer(_prompts(tokenizer), add_special_tokens=False)["input_ids"]
    n = shared_prefix_length(encoded)
    assert n > 10  # the chat template, system text and instruction
    config = DecodeConfig(max_new_tokens=1, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    prefix = PrefixCache(model.eval(), encoded[0][:n], config)
    ids, mask, positions = _suffix_inputs([e[n:] for e in encoded], n, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        out = _forward(model, config, ids, mask, positions, prefix.key, prefix.expanded(len(encoded)))
        plain = torch.cat([model(input_ids=torch.tensor([e])).logits[:, -1] for e in encoded])
    assert torch.allclose(out.logits[:, -1], plain, atol=1e-4)


@pytest.mark.parametrize("batch_size,fast_batch_size", [(1, None), (3, None), (8, None), (2, 64)])
def test_greedy_answers_equal_model_generate(tiny, batch_size, fast_batch_size):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    old = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, fast=False), batch_size=batch_size)
    new = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, fast_batch_size=fast_batch_size),
                   batch_size=batch_size)
    assert fast_path_applies(model, GenerationConfig())
    assert new == old
    assert tokenizer.padding_side == "right"


def test_constrained_answers_equal_model_generate(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    constraint = TrieConstraint(CatalogTrie.from_titles(CATALOG, tokenizer, prefix='"', suffix='"'))
    settings = GenerationConfig(max_new_tokens=16)
    old = generate(model, tokenizer, prompts, settings.model_copy(update={"fast": False}), batch_size=4,
                   logits_processor=constraint)
    new = generate(model, tokenizer, prompts, settings, batch_size=4, logits_processor=constraint)
    assert new == old
    assert all(parse_titles(a[0])[0] in CATALOG for a in new)


def test_prefix_reuse_and_finished_rows_feed_fewer_tokens(tiny):
    """Constrained answers end at different lengths: finished rows leave the batch, the prefix is fed once."""
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    constraint = TrieConstraint(CatalogTrie.from_titles(CATALOG, tokenizer, prefix='"', suffix='"'))
    with _Counter(model) as old:
        generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=16, fast=False), batch_size=8,
                 logits_processor=constraint)
    with _Counter(model) as new:
        generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=16), batch_size=8,
                 logits_processor=constraint)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    n, width = shared_prefix_length(encoded), max(len(e) for e in encoded)
    assert n > 10
    new_decoding = new.tokens - n - len(prompts) * (width - n)  # after the prefix and the suffixes' prefill
    old_decoding = old.tokens - len(prompts) * width
    assert new_decoding < old_decoding  # rows that wrote their terminator left the batch
    assert new.tokens < old.tokens - (len(prompts) - 1) * n  # the prefix's copies are not fed again


def _forced_list(tokenizer, n_titles: int = 5) -> TrieConstraint:
    """A one-entry "catalog" that forces the answer 1. "A"\\n2. "B"\\n... (a model that writes a numbered list)."""
    text = "\n".join(f'{i}. "{t}"' for i, t in enumerate(CATALOG[:n_titles], 1))
    return TrieConstraint(CatalogTrie.from_titles([text], tokenizer))


def _list_answers(model, tokenizer, stop_after_titles: int | None):
    settings = GenerationConfig(max_new_tokens=64, stop_after_titles=stop_after_titles)
    with _Counter(model) as counter:
        answers = generate(model, tokenizer, _prompts(tokenizer)[:3], settings, batch_size=3,
                           logits_processor=_forced_list(tokenizer))
    return [a[0] for a in answers], counter.calls


def test_stop_after_titles_stops_with_the_same_titles(tiny):
    model, tokenizer = tiny
    full, full_calls = _list_answers(model, tokenizer, None)
    short, short_calls = _list_answers(model, tokenizer, 2)
    assert parse_titles(full[0]) == CATALOG[:5]
    assert short_calls < full_calls - 10  # it stopped after the 2nd title's closing quote
    for f, s in zip(full, short):
        assert f.startswith(s) and len(s) < len(f)
        assert parse_titles(s) == parse_titles(f)[:2] == parse_titles(f, 2)


def test_without_the_title_rule_the_stop_test_fails(tiny, monkeypatch):
    """Injected fault: with `titles_final` never true the row runs on, so the test above would fail."""
    model, tokenizer = tiny
    _, full_calls = _list_answers(model, tokenizer, None)
    monkeypatch.setattr("recalign.llm.tasks.titles_final", lambda text, n: False)
    _, calls = _list_answers(model, tokenizer, 2)
    assert calls == full_calls


def test_titles_final_never_changes_the_first_titles():
    """Fuzz: when `titles_final(prefix, n)` holds, every continuation parses to the same first n titles."""
    rng = random.Random(0)
    alphabet = ['"', '"', "A", "b", " ", "\n", "1", "2", ".", ")", "-", "“", "”", "«", "»", ",", "13", " 2. ",
                '\n3. "']
    positives = 0
    for _ in range(1500):
        full = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for cut in range(len(full) + 1):
            for n in (1, 2, 3):
                if titles_final(full[:cut], n):
                    positives += 1
                    head = parse_titles(full[:cut])
                    assert len(head) >= n and parse_titles(full)[:n] == head[:n]
                    assert parse_titles(full, n) == parse_titles(full[:cut], n)
    assert positives > 1000
    assert titles_final('1. "Dune"\n2. "Emma"', 2) and not titles_final('1. "Dune"\n2. "Emma', 2)
    assert not titles_final("1. Dune\n2. Emma\n", 2)  # unquoted: a later quoted line would change the parse


def test_sampling_and_details_keep_model_generate(tiny):
    model, _ = tiny
    assert not fast_path_applies(model, GenerationConfig(do_sample=True))
    assert not fast_path_applies(model, GenerationConfig(num_beams=2))
    assert not fast_path_applies(model, GenerationConfig(), return_details=True)
    assert not fast_path_applies(model, GenerationConfig(fast=False))
    assert not fast_path_applies(model, GenerationConfig(), logits_processor=[lambda ids, scores: scores])


def test_buffer_layers_write_in_place_and_keep_rows(tiny):
    """The preallocated cache gives the DynamicCache's next-token logits, after a compaction and past its capacity."""
    model, tokenizer = tiny
    encoded = tokenizer(_prompts(tokenizer), add_special_tokens=False)["input_ids"]
    n = shared_prefix_length(encoded)
    config = DecodeConfig(max_new_tokens=1, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    prefix = PrefixCache(model.eval(), encoded[0][:n], config)
    ids, mask, positions = _suffix_inputs([e[n:] for e in encoded], n, tokenizer.pad_token_id, "cpu")
    results = []
    for capacity in (None, n + ids.shape[1] + 1):  # the second one must grow at the second step
        cache = prefix.expanded(len(encoded), capacity)
        with torch.no_grad():
            out = _forward(model, config, ids, mask, positions, prefix.key, cache)
            cache = getattr(out, prefix.key)
            keep = torch.tensor([0, 2, 5])
            cache.batch_select_indices(keep)
            tokens, m, last = out.logits[keep, -1].argmax(-1)[:, None], mask[keep], positions[keep, -1:]
            for _ in range(2):
                m, last = torch.cat([m, torch.ones((3, 1), dtype=m.dtype)], 1), last + 1
                out = _forward(model, config, tokens, m, last, prefix.key, cache)
                tokens = out.logits[:, -1].argmax(-1)[:, None]
        results.append(out.logits[:, -1])
        assert type(cache.layers[0]).__name__ == ("DynamicLayer" if capacity is None else "BufferLayer")
    assert torch.allclose(results[0], results[1], atol=1e-5)


@pytest.mark.parametrize("chat", [True, False])
def test_constrained_beams_prefill_each_prompt_once_with_the_same_items(tiny, chat):
    """Beam search: the prompt is prefilled once per prompt (not once per beam); items equal, scores to 1e-4."""
    from recalign.llm.constrained import constrained_beam_search

    model, tokenizer = tiny
    prompts = _prompts(tokenizer) if chat else ["Dune ->", "x", "A much longer prompt about Emma ->", "Walden ->"]
    with _Counter(model) as old:
        items, scores = constrained_beam_search(model, tokenizer, prompts, CATALOG, k=4, batch_size=3,
                                                prefill_once=False)
    with _Counter(model) as new:
        new_items, new_scores = constrained_beam_search(model, tokenizer, prompts, CATALOG, k=4, batch_size=3)
    assert torch.equal(items, new_items)
    assert torch.allclose(scores, new_scores, atol=1e-4)
    assert new.tokens < (old.tokens / 2 if chat else old.tokens)  # short prompts: the beams dominate


@pytest.mark.parametrize("rows", [3, 8])
def test_chunked_prefill_of_a_large_batch_gives_the_same_answers(tiny, monkeypatch, rows):
    """A 16-prompt batch prefills in length-sorted chunks written into one cache: answers as model.generate's."""
    model, tokenizer = tiny
    monkeypatch.setattr("recalign.llm.fastgen.PREFILL_ROWS", rows)
    prompts = _prompts(tokenizer) + [p.replace("Recommend one book", "Name a novel") for p in _prompts(tokenizer)]
    constraint = TrieConstraint(CatalogTrie.from_titles(CATALOG, tokenizer, prefix='"', suffix='"'))
    for processor in (None, constraint):
        old = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=10, fast=False), batch_size=8,
                       logits_processor=processor)
        new = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=10), batch_size=8,
                       logits_processor=processor)
        assert new == old
