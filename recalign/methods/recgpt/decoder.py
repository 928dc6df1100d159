"""RecGPT's sequence model (docs/systems/recgpt.md, "Formulas"): a small GPT-2 that reads items as code tokens.

An item is `n_positions` code tokens. The input at token j of item t is LN(wte[token]) + LN(W_text·x_t), where x_t is
the item's text vector. We add the projection of the WHOLE text vector to every token of the item by default
(`text_mode="whole"`): it works for any text width and any number of positions (a disambiguating 5th position
included). `text_mode="chunk"` is the original's variant: token j gets chunk j of the vector (the width must divide
evenly into `n_positions` chunks).

Attention is hybrid (bidirectional inside an item, causal across items, padding masked) and given to GPT2Model as a
4-D additive float mask. Position j of item t predicts token j of item t+1, all positions in parallel. Position ids
are counted from the first real token, in training and inference alike, so a score never depends on the batch size
or on which side a history was padded (a defect of the original: docs/systems/recgpt.md, "Defects of the
original code that we fixed").

Histories are LongTensors [B, T] of item ids with -1 for padding, on either side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from recalign.errors import ConfigError, DataError

PAD_ITEM = -1  # item id of a padding slot in a history tensor


@dataclass(frozen=True)
class DecoderConfig:
    """Size of the GPT-2 decoder; `max_items` bounds a history (max_items x n_positions position embeddings)."""

    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    dropout: float = 0.1
    max_items: int = 50
    text_mode: Literal["whole", "chunk"] = "whole"


def hybrid_mask(n_items: int, n_positions: int, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Additive attention mask [B, 1, L, L] (L = n_items·n_positions): 0 = may attend, float32 min = may not.

    A query attends every key of its own item and of earlier items, except padding keys (`pad`: BoolTensor [B, L],
    True at padding tokens). Every token attends itself, so no row is empty (a padding query's output is unused).
    """
    length = n_items * n_positions
    device = pad.device if pad is not None else None
    item = torch.arange(length, device=device) // n_positions
    allowed = (item[None, :] <= item[:, None])[None]  # [1, L, L]: key's item <= query's item
    if pad is not None:
        allowed = allowed & ~pad[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)
    mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


def position_ids(pad: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from the row's first real token (padding before it gets 0)."""
    return (torch.cumsum((~pad).long(), dim=1) - 1).clamp(min=0)


def code_table(codes) -> torch.Tensor:
    """The [n_items, n_positions] code values of an `ItemCodes` or of a plain LongTensor."""
    return torch.as_tensor(getattr(codes, "codes", codes), dtype=torch.long)


class RecGPTDecoder(nn.Module):
    """GPT-2 over item code tokens with the item's text vector added to each of its tokens."""

    def __init__(self, sizes: Sequence[int], text_dim: int, config: DecoderConfig = DecoderConfig()):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.sizes = tuple(int(s) for s in sizes)
        self.n_positions = len(self.sizes)
        self.config = config
        if config.text_mode not in ("whole", "chunk"):
            raise ConfigError(f"text_mode: expected 'whole' or 'chunk', got {config.text_mode!r}")
        if config.text_mode == "chunk" and text_dim % self.n_positions:
            raise ConfigError(f"text_mode 'chunk': text width {text_dim} does not split into "
                              f"{self.n_positions} equal chunks")
        if config.dim % config.n_heads:
            raise ConfigError(f"dim {config.dim} is not a multiple of n_heads {config.n_heads}")
        vocab = sum(self.sizes) + 1  # every position's codes + one pad token; no 50,257-row embedding
        self.pad_id = vocab - 1
        self.register_buffer("offsets", torch.tensor([0, *self.sizes[:-1]]).cumsum(0), persistent=False)
        gpt_config = GPT2Config(vocab_size=vocab, n_positions=config.max_items * self.n_positions, bos_token_id=None, eos_token_id=None,
                                n_embd=config.dim, n_layer=config.n_layers, n_head=config.n_heads,
                                resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout)
        gpt_config._attn_implementation = "eager"  # the additive 4-D mask is applied exactly as given
        self.gpt = GPT2Model(gpt_config)
        chunk = text_dim // self.n_positions if config.text_mode == "chunk" else text_dim
        self.text_proj = nn.Linear(chunk, config.dim, bias=False)
        self.token_norm = nn.LayerNorm(config.dim)
        self.text_norm = nn.LayerNorm(config.dim)
        # Output columns of position j: token ids offsets[j] + v for v < max(sizes); past sizes[j] they are invalid.
        width = max(self.sizes)
        columns = self.offsets[:, None] + torch.arange(width)[None, :]
        self.register_buffer("column_valid", torch.arange(width)[None, :] < torch.tensor(self.sizes)[:, None],
                             persistent=False)
        self.register_buffer("column_tokens", columns.clamp(max=vocab - 1), persistent=False)

    def forward(self, histories: torch.Tensor, codes, text_vectors: torch.Tensor) -> torch.Tensor:
        """Next-item logits [B, T, n_positions, max(sizes)]: [b, t, j, v] scores value v at position j of item t+1."""
        return self.head(self.encode(histories, codes, text_vectors))

    def encode(self, histories: torch.Tensor, codes, text_vectors: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, n_positions, dim] of every code token of every history item."""
        device = self.gpt.wte.weight.device
        table = self._checked_codes(codes).to(device)
        histories, text_vectors = histories.to(device), text_vectors.to(device)
        batch, n_items = histories.shape
        if n_items > self.config.max_items:
            raise ConfigError(f"history of {n_items} items is longer than max_items {self.config.max_items}")
        pad_item = histories == PAD_ITEM
        safe = histories.clamp(min=0)
        tokens = (table[safe] + self.offsets).masked_fill(pad_item[..., None], self.pad_id)  # [B, T, P]
        text = text_vectors[safe].float().masked_fill(pad_item[..., None], 0.0)  # [B, T, D]
        if self.config.text_mode == "chunk":
            text = self.text_proj(text.view(batch, n_items, self.n_positions, -1))  # token j <- chunk j
        else:
            text = self.text_proj(text)[:, :, None, :]  # the whole vector, added to every token
        embeds = self.token_norm(self.gpt.wte(tokens)) + self.text_norm(text)
        embeds = embeds.reshape(batch, n_items * self.n_positions, -1)
        pad = pad_item.repeat_interleave(self.n_positions, dim=1)
        hidden = self.gpt(inputs_embeds=embeds, attention_mask=hybrid_mask(n_items, self.n_positions, pad),
                          position_ids=position_ids(pad), use_cache=False).last_hidden_state
        return hidden.view(batch, n_items, self.n_positions, -1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., n_positions, max(sizes)] from hidden states [..., n_positions, dim] (-inf past sizes[j])."""
        weights = self.gpt.wte.weight[self.column_tokens]  # [P, V, d], tied to the input embedding as in GPT-2
        logits = torch.einsum("...pd,pvd->...pv", hidden, weights)
        return logits.masked_fill(~self.column_valid, float("-inf"))

    def loss(self, histories: torch.Tensor, codes, text_vectors: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of every next-item code token (pairs that touch padding are ignored, label -100)."""
        logits = self(histories, codes, text_vectors)[:, :-1]
        table, histories = code_table(codes).to(logits.device), histories.to(logits.device)
        following = histories[:, 1:]
        labels = table[following.clamp(min=0)]
        ignore = (following == PAD_ITEM) | (histories[:, :-1] == PAD_ITEM)
        labels = labels.masked_fill(ignore[..., None], -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def sparse_loss(self, histories: torch.Tensor, codes, text_vectors: torch.Tensor) -> torch.Tensor:
        """`loss` without the waste: logits only for item pairs that touch no padding, and position j's logits over
        its own sizes[j] values (a head per position); the same mean cross-entropy up to float rounding."""
        hidden = self.encode(histories, codes, text_vectors)[:, :-1]  # [B, T-1, P, d]
        table, histories = code_table(codes).to(hidden.device), histories.to(hidden.device)
        keep = (histories[:, 1:] != PAD_ITEM) & (histories[:, :-1] != PAD_ITEM)  # [B, T-1]
        hidden, labels = hidden[keep], table[histories[:, 1:][keep]]  # [n, P, d], [n, P]
        if not len(labels):
            return hidden.sum() * 0.0
        total = hidden.new_zeros(())
        for j, size in enumerate(self.sizes):  # a loop over code positions only
            start = int(self.offsets[j])
            weights = self.gpt.wte.weight[start:start + size]  # position j's values, tied to the input embedding
            total = total + F.cross_entropy(hidden[:, j] @ weights.T, labels[:, j], reduction="sum")
        return total / labels.numel()

    def next_item_log_probs(self, histories: torch.Tensor, codes, text_vectors: torch.Tensor) -> torch.Tensor:
        """Log-prob tables [B, n_positions, max(sizes)] of the item after each history's last real item.

        Entry [b, j, v] is log p(value v at position j), normalised over position j's own values (-inf past sizes[j]).
        """
        histories = histories.to(self.gpt.wte.weight.device)
        real = histories != PAD_ITEM
        steps = torch.arange(histories.shape[1], device=histories.device)
        last = torch.where(real, steps, -1).max(dim=1).values
        if (last < 0).any():
            raise DataError(f"history row {int(torch.nonzero(last < 0)[0])} has no items")
        rows = torch.arange(histories.shape[0], device=histories.device)
        hidden = self.encode(histories, codes, text_vectors)[rows, last]  # only the last item's tokens are scored
        return torch.log_softmax(self.head(hidden), dim=-1)

    def _checked_codes(self, codes) -> torch.Tensor:
        table = code_table(codes)
        if table.dim() != 2 or table.shape[1] != self.n_positions:
            raise DataError(f"item codes have shape {tuple(table.shape)}; this decoder reads "
                            f"{self.n_positions} positions")
        if table.numel() and (table >= torch.tensor(self.sizes, device=table.device)).any():
            raise DataError(f"item codes exceed this decoder's position sizes {self.sizes}")
        return table


def pad_histories(sequences: Sequence[Sequence[int]], max_items: int, side: Literal["left", "right"] = "left"
                  ) -> torch.Tensor:
    """Histories [B, T] (T = longest kept, <= max_items) of each sequence's last `max_items` items, -1 padded."""
    kept = [torch.as_tensor(list(s)[-max_items:] if max_items else [], dtype=torch.long) for s in sequences]
    width = max((len(s) for s in kept), default=0)
    out = torch.full((len(kept), width), PAD_ITEM, dtype=torch.long)
    for row, seq in enumerate(kept):  # one copy per sequence; the model itself never loops
        if len(seq):
            if side == "left":
                out[row, width - len(seq):] = seq
            else:
                out[row, :len(seq)] = seq
    return out
