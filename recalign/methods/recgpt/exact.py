"""Exact full-catalog scoring: every catalog item's summed code log-prob, ranked (docs/systems/recgpt.md,
"Exact scoring").

The beam (beam.py) scores an item as the sum over its code positions of the decoder's log-softmax at that position
(`RecGPTDecoder.next_item_log_probs`: normalised over the position's whole value range, not renormalised over the
trie's allowed children); the trie only decides which prefixes may be extended. Exact scoring
computes that same sum for every item, so it ranks the catalog as a beam wide enough to keep every prefix would.
With history exclusion, a user's history items score -inf (as the beam drops them at the last step).

The prefix tree is walked level by level with tensor ops: depth d's prefix scores are their parent's score plus the
log-prob of the edge's code, for all users and edges at once ([B, prefixes]), so each shared prefix is summed once.
One decoder pass per user batch; no Python loop over items.
"""

from __future__ import annotations

import torch

from recalign.errors import DataError
from recalign.methods.recgpt.beam import NEG, BeamLists, CodeTrie

__all__ = ["ExactLists", "exact_scores", "top_items"]


def exact_scores(log_probs: torch.Tensor, trie: CodeTrie, history: torch.Tensor | None = None) -> torch.Tensor:
    """Summed code log-prob [B, N] of every catalog item for every row of `log_probs` [B, P, V]; items marked in
    `history` [B, N] (bool) get -inf. Sums run position by position in float32, as the beam adds them."""
    batch, n_positions, vocab = log_probs.shape
    if n_positions != trie.n_positions:
        raise DataError(f"log-prob tables have {n_positions} positions; the catalog codes have {trie.n_positions}")
    if trie.key_base > vocab:
        raise DataError(f"catalog code value {trie.key_base - 1} is outside the log-prob tables' {vocab} values")
    log_probs = log_probs.float()
    prefix_score = torch.zeros(batch, 1)  # the root
    for depth in range(n_positions):  # a loop over code positions only
        indptr = trie.indptr[depth]
        edge_parent = torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr[1:] - indptr[:-1])
        edge_score = prefix_score[:, edge_parent] + log_probs[:, depth, trie.edge_code[depth]]
        prefix_score = torch.empty(batch, len(edge_parent))
        prefix_score[:, trie.edge_child[depth]] = edge_score
    scores = torch.empty(batch, len(trie.item_of_leaf))
    scores[:, trie.item_of_leaf] = prefix_score  # leaf prefix id -> its item
    if history is not None:
        scores = scores.masked_fill(history, NEG)
    return scores


def top_items(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best items per row [B, min(k, N)], ties by item id, -1 where the score is -inf."""
    ranked_scores, ranked = torch.sort(scores, dim=1, descending=True, stable=True)
    ranked_scores, ranked = ranked_scores[:, :k], ranked[:, :k]
    return torch.where(torch.isfinite(ranked_scores), ranked, -1)


class ExactLists(BeamLists):
    """RecGPT as a `ListRecommender` with exact full-catalog scoring instead of the beam (same batching, empty
    histories and history exclusion as `BeamLists`; the beam widths are not used)."""

    def lists(self, log_probs: torch.Tensor, seen: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k items [B, <= k] of the whole catalog by summed code log-prob."""
        return top_items(exact_scores(log_probs, self.trie, seen if self.settings.exclude_history else None), k)
