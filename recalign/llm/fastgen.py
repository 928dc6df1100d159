"""Greedy decoding that spends the CPU on new work (the transformers backend's default greedy path).

`recalign.llm.generate.generate` calls `decode_greedy` for greedy, one-answer, no-detail decoding (free text or
under a `TrieConstraint`); sampling, beams and `return_details` stay on `model.generate`. Three savings, each
keeping today's answers:

- shared-prefix KV reuse: every prompt of a task shares its chat template, system text and instruction. The
  longest common token prefix of all prompts of the call is run once (batch 1); each batch expands its KV cache
  and prefills only the suffixes. Suffixes are left-padded *after* the prefix, the padding masked out and every
  token given its true position (explicit `position_ids`), so each row attends to exactly its own tokens at
  exactly the positions of the unpadded prompt: the logits equal the plain path's to float rounding.
- early stop per row: a row ends at EOS, at the trie terminator of a constrained answer (what follows it can only
  be more terminators, removed as special tokens), or, with `stop_after_titles=n`, as soon as the first n titles
  of the answer are final (`recalign.llm.tasks.titles_final`); finished rows leave the batch once they are a
  quarter of it (their KV rows dropped), and the batch stops when no row is left.
- large length-sorted batches (`GenerationConfig.fast_batch_size`, 64: a 64-row step costs little more than an
  8-row one on a CPU), prefilled in chunks of `PREFILL_ROWS` (little padding), with a KV cache written in place
  (`BufferLayer`) instead of concatenated every step.

`recalign.llm.constrained.constrained_beam_search` uses `PrefixCache` and `_suffix_inputs` to prefill each prompt
once before `model.generate`'s beam search.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers.cache_utils import DynamicLayer


@dataclass
class DecodeConfig:
    """What one greedy decoding call needs besides the model: limits, stop tokens, and the stop rule."""

    max_new_tokens: int
    eos_ids: Sequence[int]
    pad_id: int
    stop_after_titles: int | None = None        # stop a row once its first n titles are final
    processor: Any = None                       # None or an object with `for_batch(0)` (e.g. TrieConstraint)
    reuse_prefix: bool = True
    stats: dict[str, int] = field(default_factory=lambda: {"forward_calls": 0, "tokens_fed": 0})  # counted


def cache_argument(model) -> str:
    """The keyword under which this model's forward takes and returns its KV cache ('cache' in transformers
    5.2x, 'past_key_values' before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def shared_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, keeping at least one suffix token per prompt (it yields the first logits)."""
    if not encoded:
        return 0
    first = encoded[0]
    n = min(len(ids) for ids in encoded) - 1
    for ids in encoded[1:]:
        m = 0
        while m < n and ids[m] == first[m]:
            m += 1
        n = m
    return max(n, 0)


class PrefixCache:
    """The KV cache of the shared prefix, computed once (batch 1), expanded to any batch size on demand."""

    def __init__(self, model, prefix: Sequence[int], config: DecodeConfig):
        self.model, self.length, self.key = model, len(prefix), cache_argument(model)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.length:
            device = next(model.parameters()).device
            ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
            out = _forward(model, config, ids, torch.ones_like(ids), None, self.key, None)
            cache = getattr(out, self.key)
            self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def expanded(self, batch: int, capacity: int | None = None):
        """A fresh cache holding the prefix for `batch` rows; with `capacity` (tokens per row, prefix included)
        its layers write into buffers allocated once (`BufferLayer`) when the model's layers allow it."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if capacity is not None and all(type(layer) is DynamicLayer for layer in cache.layers):
            cache.layers = [BufferLayer(capacity) for _ in cache.layers]
        for layer, (k, v) in zip(cache.layers, self.layers):
            layer.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
        return cache


class BufferLayer(DynamicLayer):
    """A transformers `DynamicLayer` whose keys/values live in a buffer of `capacity` positions allocated once:
    each step writes its new positions in place instead of concatenating (copying) the whole cache, which took
    ~70% of a 64-row decoding step of SmolLM2 on CPU. `keys`/`values` are views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = int(capacity), 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        rows, heads = key_states.shape[:2]
        # Zeros, not garbage: masked positions must hold finite values (0 weight x NaN would be NaN).
        self.key_buffer = key_states.new_zeros((rows, heads, self.capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_zeros((rows, value_states.shape[1], self.capacity,
                                                    value_states.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # never with the capacity decode_greedy asks for; grow rather than fail
            self.capacity = max(end, 2 * self.capacity)
            self.key_buffer = _grown(self.key_buffer, self.length, self.capacity)
            self.value_buffer = _grown(self.value_buffer, self.length, self.capacity)
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys = self.key_buffer[:, :, :self.length]
            self.values = self.value_buffer[:, :, :self.length]


def _grown(buffer: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    grown = buffer.new_empty(buffer.shape[:2] + (capacity,) + buffer.shape[3:])
    grown[:, :, :length] = buffer[:, :, :length]
    return grown


def _forward(model, config: DecodeConfig, ids, mask, positions, key: str, cache):
    config.stats["forward_calls"] += 1
    config.stats["tokens_fed"] += int(ids.numel())
    options = {key: cache} if cache is not None else {}
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                 **options)


def decode_greedy(model, tokenizer, encoded: Sequence[Sequence[int]], order: Sequence[int], batch_size: int,
                  config: DecodeConfig, batches: Callable[[int], Any] | None = None) -> list[list[str]]:
    """Greedy answers of the tokenized prompts `encoded`, batched in `order`; one answer per prompt, input order."""
    prefix_length = shared_prefix_length(encoded) if config.reuse_prefix else 0
    prefix = PrefixCache(model, encoded[0][:prefix_length] if encoded else [], config)
    answers: list[list[str]] = [[] for _ in encoded]
    starts = batches(len(order)) if batches is not None else range(0, len(order), batch_size)
    for start in starts:
        index = list(order[start:start + batch_size])
        tokens = _decode_batch(model, tokenizer, [encoded[i][prefix_length:] for i in index], prefix, config)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for row, i in enumerate(index):
            answers[i] = [texts[row]]
    return answers


def _suffix_inputs(suffixes: list[Sequence[int]], prefix_length: int, pad_id: int, device):
    """Left-padded suffix ids [B, W], the mask over prefix + suffix [B, P + W], and true positions [B, W]."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, s in enumerate(suffixes):
        ids[row, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        real[row, width - len(s):] = 1
    positions = (prefix_length + real.cumsum(1) - 1).clamp(min=prefix_length)
    mask = torch.cat([torch.ones((len(suffixes), prefix_length), dtype=torch.long), real], dim=1)
    return ids.to(device), mask.to(device), positions.to(device)


PREFILL_ROWS = 8  # rows per prefill chunk: length-sorted chunks of 8 pad ~1% of the tokens, one chunk of 64 ~10%


def _prefill(model, config: DecodeConfig, prefix: PrefixCache, ids: torch.Tensor, mask: torch.Tensor,
             positions: torch.Tensor):
    """(the batch's cache after its suffixes, the last position's logits [B, V]).

    Large batches prefill in chunks of `PREFILL_ROWS` rows, each padded only to its own longest suffix, and the
    chunks' keys/values are written into the batch's buffers right-aligned (the positions between prefix and a
    shorter suffix stay zero and masked, as padding would be)."""
    rows, width = ids.shape
    cache = prefix.expanded(rows, prefix.length + width + config.max_new_tokens)
    if rows <= PREFILL_ROWS or not prefix.length or not isinstance(cache.layers[0], BufferLayer):
        out = _forward(model, config, ids, mask, positions, prefix.key, cache)
        return getattr(out, prefix.key), out.logits[:, -1, :]
    logits, n = [], prefix.length
    for start in range(0, rows, PREFILL_ROWS):
        part = slice(start, min(start + PREFILL_ROWS, rows))
        real = int(mask[part, n:].sum(1).max())  # the chunk's longest suffix
        chunk_mask = torch.cat([mask[part, :n], mask[part, n + width - real:]], dim=1)
        out = _forward(model, config, ids[part, width - real:], chunk_mask, positions[part, width - real:],
                       prefix.key, prefix.expanded(part.stop - start))
        for layer, chunk in zip(cache.layers, getattr(out, prefix.key).layers):
            layer.key_buffer[part, :, n + width - real:n + width] = chunk.keys[:, :, n:]
            layer.value_buffer[part, :, n + width - real:n + width] = chunk.values[:, :, n:]
        logits.append(out.logits[:, -1, :])
    for layer in cache.layers:
        layer.length = n + width
        layer.keys, layer.values = layer.key_buffer[:, :, :n + width], layer.value_buffer[:, :, :n + width]
    return cache, torch.cat(logits)


def _decode_batch(model, tokenizer, suffixes: list[Sequence[int]], prefix: PrefixCache,
                  config: DecodeConfig) -> list[list[int]]:
    """The generated token ids of one batch, each row up to where it stopped (its stop token included).

    Finished rows stay in the batch (fed padding, ignored) until they are a quarter of it; then the batch is
    compacted: dropping rows copies the cache, so it is not done for every row that ends."""
    device = next(model.parameters()).device
    ids, mask, positions = _suffix_inputs(suffixes, prefix.length, config.pad_id, device)
    cache, logits = _prefill(model, config, prefix, ids, mask, positions)
    processor = config.processor.for_batch(0) if config.processor is not None else None
    stop = _StopRule(tokenizer, config, device)
    rows = torch.arange(len(suffixes), device=device)         # original row of each batch row
    active = torch.ones(len(suffixes), dtype=torch.bool, device=device)
    generated = torch.zeros((len(suffixes), 0), dtype=torch.long, device=device)
    lengths = torch.full((len(suffixes),), config.max_new_tokens, dtype=torch.long)  # tokens each row keeps
    last = positions[:, -1]
    for t in range(config.max_new_tokens):
        scores = logits.float()
        if processor is not None:
            scores = processor(generated[rows], scores)
        step = torch.full((len(suffixes),), config.pad_id, dtype=torch.long, device=device)
        step[rows] = torch.where(active, scores.argmax(-1), step[rows])
        generated = torch.cat([generated, step[:, None]], dim=1)
        ended = stop.finished(generated, rows, active)
        lengths[rows[ended].cpu()] = t + 1
        active &= ~ended
        if not bool(active.any()):
            break
        if 4 * int((~active).sum()) >= len(rows):
            keep = active.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, active, mask, last = rows[keep], active[keep], mask[keep], last[keep]
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
        last = last + 1
        out = _forward(model, config, generated[rows, -1:], mask, last[:, None], prefix.key, cache)
        logits = out.logits[:, -1, :]
    return [row[:n] for row, n in zip(generated.tolist(), lengths.tolist())]


class _StopRule:
    """Which alive rows are finished after the newest token: a stop token, or (opt-in) n final titles."""

    def __init__(self, tokenizer, config: DecodeConfig, device):
        self.tokenizer, self.n_titles = tokenizer, config.stop_after_titles
        self.stop_ids = set(int(i) for i in config.eos_ids)
        terminator = int(config.processor.trie.eos_token_id) if config.processor is not None else None
        if terminator in set(tokenizer.all_special_ids):  # after it only more terminators, removed when decoded
            self.stop_ids.add(terminator)
        self.stop = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=device)

    def finished(self, generated: torch.Tensor, rows: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """[len(rows)] bool: the active row just emitted a stop token or its answer's titles are complete."""
        done = torch.isin(generated[rows, -1], self.stop) & active
        if self.n_titles is None:
            return done
        from recalign.llm import tasks

        for row, token in enumerate(generated[rows, -1].tolist()):
            if done[row] or not active[row]:
                continue
            # Only a newline or a quote can make a title final: the other steps need no decoding.
            piece = self.tokenizer.decode([token], skip_special_tokens=True)
            if "\n" in piece or '"' in piece:
                text = self.tokenizer.decode(generated[int(rows[row])].tolist(), skip_special_tokens=True)
                done[row] = tasks.titles_final(text, self.n_titles)
        return done

