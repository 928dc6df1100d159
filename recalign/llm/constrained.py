"""Trie-constrained decoding: every generated title is a catalog item.

The catalog's token sequences (each ending with an EOS terminator) are flattened into a prefix tree stored as
tensors (the STATIC idea; docs/systems/llm_sft.md describes constrained decoding):

- ``keys_``: sorted ``parent * vocab_size + token`` of every edge, with ``children_`` the child node of each key, so
  one decoding step advances all beams with one ``searchsorted`` (no Python loop per beam);
- ``indptr_`` / ``tokens_``: the allowed next tokens of every node in CSR form, so the mask of all beams is one
  gather of precomputed rows by node id, expanded with ``repeat_interleave``;
- ``node_item_``: the item id at each leaf (the node reached after the terminator).

Node 0 is the root; node ``n_nodes`` is a "dead" sink for paths that left the trie. Leaves and the sink allow only
the terminator, so a masked row never becomes all ``-inf`` (which would turn beam scores into NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError, DataError


class CatalogTrie:
    """Flattened prefix tree over the token sequences of catalog items (build with `from_sequences`/`from_titles`)."""

    def __init__(
        self,
        keys: torch.Tensor,
        children: torch.Tensor,
        indptr: torch.Tensor,
        tokens: torch.Tensor,
        node_item: torch.Tensor,
        edge_start: torch.Tensor,
        *,
        vocab_size: int,
        eos_token_id: int,
        max_depth: int,
        duplicate_items: torch.Tensor,
    ):
        self.keys_ = keys
        self.children_ = children
        self.indptr_ = indptr
        self.tokens_ = tokens
        self.node_item_ = node_item
        # Position of each node's first outgoing edge in `keys_` and its number of edges (the dead sink: 0).
        self.edge_start_ = edge_start
        self.edge_count_ = torch.bincount(keys // vocab_size, minlength=node_item.shape[0])
        self.vocab_size = int(vocab_size)
        self.eos_token_id = int(eos_token_id)
        self.max_depth = int(max_depth)
        # Items whose token sequence equals that of a lower item id: they can never be generated.
        self.duplicate_items_ = duplicate_items
        self.n_nodes = int(node_item.shape[0]) - 1
        self.dead = self.n_nodes
        self._device_copies: dict[torch.device, CatalogTrie] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        *,
        eos_token_id: int,
        item_ids: Sequence[int] | None = None,
        vocab_size: int | None = None,
    ) -> CatalogTrie:
        """Build the trie from one token sequence per item; the EOS terminator is appended here."""
        if len(sequences) == 0:
            raise DataError("the catalog is empty: constrained decoding needs at least one item")
        items = np.arange(len(sequences), dtype=np.int64) if item_ids is None else np.asarray(item_ids, np.int64)
        if items.shape != (len(sequences),):
            raise ConfigError(f"item_ids has {items.shape[0]} entries but there are {len(sequences)} sequences")
        lengths = np.fromiter((len(s) + 1 for s in sequences), dtype=np.int64, count=len(sequences))
        width = int(lengths.max())
        matrix = np.full((len(sequences), width), -1, dtype=np.int64)
        flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(lengths.sum() - len(lengths)))
        rows = np.repeat(np.arange(len(sequences)), lengths - 1)
        cols = np.arange(flat.shape[0]) - np.repeat(np.cumsum(lengths - 1) - (lengths - 1), lengths - 1)
        matrix[rows, cols] = flat
        matrix[np.arange(len(sequences)), lengths - 1] = eos_token_id
        bad = rows[(flat == eos_token_id) | (flat < 0)]
        if bad.size:
            raise DataError(
                f"item {int(items[bad[0]])}: its token sequence contains the terminator (EOS) or a negative id",
                field="title",
            )
        max_token = int(matrix.max())
        vocab = max_token + 1 if vocab_size is None else int(vocab_size)
        if max_token >= vocab:
            raise ConfigError(f"token id {max_token} is outside vocab_size={vocab}")
        return cls._from_matrix(matrix, lengths, items, vocab, eos_token_id)

    @classmethod
    def from_titles(
        cls,
        titles: Sequence[str],
        tokenizer: Any,
        *,
        prefix: str = "",
        suffix: str = "",
        item_ids: Sequence[int] | None = None,
        eos_token_id: int | None = None,
    ) -> CatalogTrie:
        """Tokenise ``prefix + title + suffix`` for every item (no special tokens) and build the trie.

        ``prefix``/``suffix`` must be the text that surrounds the title in the completion (for example the
        opening quote and the closing quote plus newline), so that trie paths are the token paths a model emits.
        """
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no eos_token_id: pass eos_token_id= for the terminator")
        encoded = tokenizer([f"{prefix}{t}{suffix}" for t in titles], add_special_tokens=False)["input_ids"]
        return cls.from_sequences(encoded, eos_token_id=eos, item_ids=item_ids, vocab_size=len(tokenizer))

    @classmethod
    def _from_matrix(
        cls, matrix: np.ndarray, lengths: np.ndarray, items: np.ndarray, vocab: int, eos: int
    ) -> CatalogTrie:
        n, width = matrix.shape
        # Lexicographic order (padding -1 sorts first); the item id as last key puts duplicates lowest id first.
        order = np.lexsort((items,) + tuple(matrix[:, c] for c in range(width - 1, -1, -1)))
        m, items_sorted, lengths_sorted = matrix[order], items[order], lengths[order]
        # A node starts where the prefix up to column d differs from the previous row's prefix.
        differs = np.ones((n, width), dtype=bool)
        differs[1:] = np.logical_or.accumulate(m[1:] != m[:-1], axis=1)
        new = differs & (m >= 0)
        # Node ids in depth-major order (root = 0), forward-filled down each column.
        ids = np.cumsum(new.T.ravel()).reshape(width, n).T * new
        node_of = np.maximum.accumulate(ids, axis=0)
        n_nodes = int(new.sum()) + 1
        rr, cc = np.nonzero(new)
        child = node_of[rr, cc]
        parent = np.where(cc == 0, 0, node_of[rr, np.maximum(cc - 1, 0)])
        token = m[rr, cc]
        keys = parent * vocab + token
        by_key = np.argsort(keys, kind="stable")
        keys, child, parent, token = keys[by_key], child[by_key], parent[by_key], token[by_key]

        # CSR of allowed tokens; leaves and the dead sink (id n_nodes) allow only the terminator.
        n_children = np.bincount(parent, minlength=n_nodes + 1)
        n_allowed = np.maximum(n_children, 1)
        indptr = np.zeros(n_nodes + 2, dtype=np.int64)
        np.cumsum(n_allowed, out=indptr[1:])
        allowed = np.full(int(indptr[-1]), eos, dtype=np.int64)
        edge_starts = np.cumsum(n_children) - n_children
        rank = np.arange(keys.shape[0]) - edge_starts[parent]
        allowed[indptr[parent] + rank] = token

        leaf = node_of[np.arange(n), lengths_sorted - 1]
        node_item = np.full(n_nodes + 1, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(node_item, leaf, items_sorted)
        duplicates = np.sort(items_sorted[node_item[leaf] != items_sorted])
        node_item[node_item == np.iinfo(np.int64).max] = -1
        return cls(
            torch.from_numpy(keys),
            torch.from_numpy(child),
            torch.from_numpy(indptr),
            torch.from_numpy(allowed),
            torch.from_numpy(node_item),
            torch.from_numpy(edge_starts),
            vocab_size=vocab,
            eos_token_id=eos,
            max_depth=width,
            duplicate_items=torch.from_numpy(duplicates),
        )

    # ------------------------------------------------------------------ queries
    def to(self, device: torch.device | str) -> CatalogTrie:
        """This trie with its tables on ``device`` (copies are cached)."""
        device = torch.device(device)
        if device == self.keys_.device:
            return self
        if device not in self._device_copies:
            self._device_copies[device] = CatalogTrie(
                self.keys_.to(device),
                self.children_.to(device),
                self.indptr_.to(device),
                self.tokens_.to(device),
                self.node_item_.to(device),
                self.edge_start_.to(device),
                vocab_size=self.vocab_size,
                eos_token_id=self.eos_token_id,
                max_depth=self.max_depth,
                duplicate_items=self.duplicate_items_.to(device),
            )
        return self._device_copies[device]

    def root(self, n: int) -> torch.Tensor:
        """Node ids of ``n`` fresh beams (all at the root)."""
        return torch.zeros(n, dtype=torch.long, device=self.keys_.device)

    def advance(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Node reached from each ``nodes[i]`` by ``tokens[i]`` (the dead sink when the edge does not exist)."""
        tokens = tokens.long()
        keys = nodes * self.vocab_size + tokens
        count = self.edge_count_[nodes]
        # Most nodes below the first few tokens have one child: its edge is at edge_start_. Only beams at
        # branching nodes need the binary search over all edge keys.
        pos = self.edge_start_[nodes]
        branching = (count > 1).nonzero().squeeze(1)
        if branching.numel():
            pos[branching] = torch.searchsorted(self.keys_, keys[branching])
        pos.clamp_(max=self.keys_.shape[0] - 1)
        # Out-of-range tokens would alias another node's key, hence the explicit range check.
        hit = (self.keys_[pos] == keys) & (count > 0) & (tokens >= 0) & (tokens < self.vocab_size)
        return torch.where(hit, self.children_[pos], torch.full_like(nodes, self.dead))

    def walk(self, token_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Walk every row of ``token_matrix`` [B, T] from the root; return (final nodes, item ids or -1)."""
        nodes = self.root(token_matrix.shape[0]).to(token_matrix.device)
        items = torch.full_like(nodes, -1)
        node_item = self.node_item_
        for t in range(token_matrix.shape[1]):  # loop over positions, vectorised over rows
            nodes = self.advance(nodes, token_matrix[:, t])
            items = torch.where(items < 0, node_item[nodes], items)
        return nodes, items

    def allowed(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All allowed (row, token) pairs for beams at ``nodes``: the CSR rows of the nodes, concatenated."""
        start = self.indptr_[nodes]
        count = self.indptr_[nodes + 1] - start
        rows = torch.repeat_interleave(count)
        offset = torch.arange(rows.shape[0], device=nodes.device) - (torch.cumsum(count, 0) - count)[rows]
        return rows, self.tokens_[start[rows] + offset]

    def allowed_padded(self, nodes: torch.Tensor) -> torch.Tensor:
        """Allowed next tokens per beam as [B, max allowed] with -1 padding."""
        start = self.indptr_[nodes]
        count = self.indptr_[nodes + 1] - start
        rows = torch.repeat_interleave(count)
        offset = torch.arange(rows.shape[0], device=nodes.device) - (torch.cumsum(count, 0) - count)[rows]
        out = torch.full((nodes.shape[0], int(count.max()) if count.numel() else 0), -1, dtype=torch.long,
                         device=nodes.device)
        out[rows, offset] = self.tokens_[start[rows] + offset]
        return out

    def mask_(self, scores: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Set every disallowed entry of ``scores`` [B, V] to -inf, in place; return ``scores``."""
        if scores.shape[1] < self.vocab_size:
            raise ConfigError(f"scores have {scores.shape[1]} columns but the trie uses vocab_size={self.vocab_size}")
        rows, tokens = self.allowed(nodes)
        kept = scores[rows, tokens]
        scores.fill_(float("-inf"))
        scores[rows, tokens] = kept
        return scores


class TrieLogitsProcessor:
    """HF `generate` logits processor: keep only tokens that continue a catalog item's token path.

    `generate` reorders beams between steps without telling processors, so each row's parent is found again:
    the hash of the row's generated prefix is looked up among the previous step's rows (an exact token
    comparison confirms it), and the parent's trie node is advanced by the new token. Rows without a confirmed
    parent (first call, another generate run) are walked from the root, one vectorised lookup per position.
    """

    def __init__(self, trie: CatalogTrie, prompt_length: int):
        self.trie = trie
        self.prompt_length = int(prompt_length)
        self._previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._weights: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Mask ``scores`` [B, V] to the allowed continuations of each row of ``input_ids``."""
        trie = self.trie.to(scores.device)
        return trie.mask_(scores, self.nodes(input_ids[:, self.prompt_length :]))

    def _hash(self, tokens: torch.Tensor) -> torch.Tensor:
        """64-bit hash of each row (random odd weight per position; int64 arithmetic wraps around)."""
        width = tokens.shape[1]
        if self._weights is None or self._weights.shape[0] < width or self._weights.device != tokens.device:
            gen = torch.Generator().manual_seed(0)
            w = torch.randint(-(2**62), 2**62, (max(64, 2 * width),), generator=gen) | 1
            self._weights = w.to(tokens.device)
        return (tokens * self._weights[:width]).sum(1)

    def nodes(self, generated: torch.Tensor) -> torch.Tensor:
        """Trie node of every row of ``generated`` [B, T] (the tokens after the prompt)."""
        trie = self.trie.to(generated.device)
        rows, width = generated.shape
        nodes = None
        if self._previous is not None and width >= 1 and self._previous[0].shape[1] == width - 1:
            prev_tokens, prev_nodes, prev_hashes, prev_order = self._previous
            prefix = generated[:, :-1]
            h = self._hash(prefix)
            pos = torch.searchsorted(prev_hashes, h).clamp_(max=prev_hashes.shape[0] - 1)
            parent = prev_order[pos]
            confirmed = (prev_hashes[pos] == h) & (prev_tokens[parent] == prefix).all(1)
            nodes = trie.advance(prev_nodes[parent], generated[:, -1])
            if not bool(confirmed.all()):
                lost = (~confirmed).nonzero().squeeze(1)
                nodes[lost] = trie.walk(generated[lost])[0]
        if nodes is None:
            nodes = trie.walk(generated)[0]
        hashes, order = torch.sort(self._hash(generated))
        self._previous = (generated.clone(), nodes, hashes, order)
        return nodes


class BeamSearchConfig(BaseModel):
    """Settings of trie-constrained beam search over catalog titles."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, description="number of distinct items returned per prompt")
    num_beams: int | None = Field(None, ge=1, description="beam width; default k; raised to max(k, 2) when smaller")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    length_penalty: float = Field(
        1.0, description="HF length penalty: score = sum log-prob / length**penalty (0 = plain sum)"
    )
    early_stopping: bool | str = Field(
        "never", description='HF early_stopping; "never" keeps searching until no running beam can still win'
    )
    add_special_tokens: bool = Field(
        False, description="let the tokenizer add special tokens to the prompts (False: prompts are chat-templated)"
    )
    prefix: str = Field("", description="text of the completion before the title (e.g. an opening quote)")
    suffix: str = Field("", description="text of the completion after the title (e.g. a closing quote + newline)")
    prefill_once: bool = Field(
        True, description="prefill each prompt once (its batch's shared prefix once), then copy the KV cache to "
                          "the beams; false: model.generate prefills every beam's copy of the prompt"
    )


def constrained_beam_search(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    catalog: CatalogTrie | Sequence[str],
    config: BeamSearchConfig | None = None,
    progress: bool = False,
    **overrides: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct catalog items per prompt by trie-constrained beam search.

    Returns (items LongTensor [N, k], scores FloatTensor [N, k]) sorted by score descending (ties by ascending
    item id), padded with -1 / -inf when fewer than k distinct items were found. ``prompts`` are full prompt
    strings (chat template already applied).
    """
    from transformers import LogitsProcessorList

    cfg = _beam_search_config(config, overrides)
    trie = catalog if isinstance(catalog, CatalogTrie) else CatalogTrie.from_titles(
        catalog, tokenizer, prefix=cfg.prefix, suffix=cfg.suffix
    )
    # At least 2 beams: HF's greedy path returns no sequence scores.
    num_beams = max(cfg.num_beams or cfg.k, cfg.k, 2)
    device = next(model.parameters()).device
    trie = trie.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else trie.eos_token_id
    all_items, all_scores = [], []
    batches = range(0, len(prompts), cfg.batch_size)
    if progress:
        from rich.progress import track

        batches = track(batches, description="constrained beam search")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generated tokens must start at the same column for every row
    try:
        for start in batches:
            texts = list(prompts[start : start + cfg.batch_size])
            if cfg.prefill_once:
                input_ids, mask, cache = _prefilled(model, tokenizer, texts, cfg, num_beams, pad_id)
            else:
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=cfg.add_special_tokens)
                input_ids, mask, cache = batch["input_ids"].to(device), batch["attention_mask"].to(device), None
            out = _generate_beams(model, input_ids, mask,
                                  LogitsProcessorList([TrieLogitsProcessor(trie, input_ids.shape[1])]),
                                  trie, cfg, num_beams, pad_id, cache)
            items, scores = _beam_items(trie, out, input_ids.shape[1], num_beams, cfg.k)
            all_items.append(items)
            all_scores.append(scores)
    finally:
        tokenizer.padding_side = old_side
    return torch.cat(all_items), torch.cat(all_scores)


def _beam_search_config(config: BeamSearchConfig | None, overrides: dict[str, Any]) -> BeamSearchConfig:
    """`config` (default: the defaults) with `overrides` applied and validated; invalid values raise ConfigError."""
    try:
        return BeamSearchConfig(**{**(config or BeamSearchConfig()).model_dump(), **overrides})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"constrained beam search: {str(exc).splitlines()[0]} ({sorted(overrides)})") from exc


def _prefilled(model: Any, tokenizer: Any, texts: list[str], cfg: BeamSearchConfig, num_beams: int, pad_id: int
               ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(input ids [B, P + W], attention mask, KV cache of all but the last column, copied to every beam).

    The batch's shared token prefix is run once and the suffixes, left-padded after it (padding masked, true
    positions; `recalign.llm.fastgen`), once per prompt; `model.generate` then feeds only the last prompt column
    of each beam (its position ids come from the mask's cumulative sum: the padding in the middle is skipped)."""
    from recalign.llm.fastgen import DecodeConfig, PrefixCache, _forward, _suffix_inputs, shared_prefix_length

    device = next(model.parameters()).device
    encoded = tokenizer(texts, add_special_tokens=cfg.add_special_tokens)["input_ids"]
    n = shared_prefix_length(encoded)
    config = DecodeConfig(max_new_tokens=1, eos_ids=[], pad_id=pad_id)
    with torch.no_grad():
        prefix = PrefixCache(model, encoded[0][:n], config)
        ids, mask, positions = _suffix_inputs([e[n:] for e in encoded], n, pad_id, device)
        cache = prefix.expanded(len(encoded))
        if ids.shape[1] > 1:
            out = _forward(model, config, ids[:, :-1], mask[:, :-1], positions[:, :-1], prefix.key, cache)
            cache = getattr(out, prefix.key)
    prompt = torch.tensor(encoded[0][:n], dtype=torch.long, device=device).expand(len(encoded), n)
    cache.batch_repeat_interleave(num_beams)
    return torch.cat([prompt, ids], dim=1), mask, cache


def _generate_beams(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, processors: Any,
                    trie: CatalogTrie, cfg: BeamSearchConfig, num_beams: int, pad_id: int, cache: Any = None) -> Any:
    """One HF beam-search `generate` call under the trie's logits processor: all `num_beams` beams per prompt,
    with their sequence scores (`cache`: the prompts' KV cache, already one copy per beam)."""
    from recalign.llm.fastgen import cache_argument

    extra = {cache_argument(model): cache} if cache is not None else {}
    with torch.no_grad():
        return model.generate(
            **extra,
            input_ids=input_ids,
            attention_mask=attention_mask,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            do_sample=False,
            max_new_tokens=trie.max_depth,
            length_penalty=cfg.length_penalty,
            early_stopping=cfg.early_stopping,
            eos_token_id=trie.eos_token_id,
            pad_token_id=pad_id,
            logits_processor=processors,
            output_scores=True,
            return_dict_in_generate=True,
        )


def _beam_items(trie: CatalogTrie, out: Any, prompt_width: int, num_beams: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(items [B, k], scores [B, k]) of one batch: the item each beam spells, the best k distinct per prompt."""
    _, items = trie.walk(out.sequences[:, prompt_width:])
    return _distinct_top_k(
        items.view(-1, num_beams).cpu(), out.sequences_scores.view(-1, num_beams).float().cpu(), k
    )


def _distinct_top_k(items: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: drop invalid sequences (no item, or a score carrying HF's -1e9 'not finished' penalty),
    keep each item's best score, sort by score descending then item ascending, pad to k."""
    valid = (items >= 0) & torch.isfinite(scores) & (scores > -1e8)
    scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    items = torch.where(valid, items, torch.full_like(items, -1))
    # Order by item ascending, then stable by score descending: ties end up by ascending item id.
    by_item = torch.sort(items, dim=1, stable=True).indices
    items, scores = items.gather(1, by_item), scores.gather(1, by_item)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    items, scores = items.gather(1, by_score), scores.gather(1, by_score)
    # The first (best) occurrence of an item survives; later ones are duplicates.
    by_item2 = torch.sort(items, dim=1, stable=True)
    dup_sorted = torch.zeros_like(items, dtype=torch.bool)
    dup_sorted[:, 1:] = by_item2.values[:, 1:] == by_item2.values[:, :-1]
    duplicate = torch.zeros_like(dup_sorted).scatter_(1, by_item2.indices, dup_sorted)
    keep = (items >= 0) & ~duplicate
    scores = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    items, scores = items.gather(1, order), scores.gather(1, order)
    items = torch.where(torch.isfinite(scores), items, torch.full_like(items, -1))
    pad = max(0, k - items.shape[1])
    if pad:
        items = torch.cat([items, torch.full((items.shape[0], pad), -1, dtype=items.dtype)], 1)
        scores = torch.cat([scores, torch.full((scores.shape[0], pad), float("-inf"))], 1)
    return items[:, :k], scores[:, :k]
