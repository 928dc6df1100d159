"""Generated answers -> grounded lists (docs/metrics.md §2.4) for the one list evaluator in `recalign.eval.lists`.

A generated answer of row u is parsed into titles o_u and grounded; ``GeneratedLists.grounded`` [U, k] holds the
first k entries: an item id, ``NOT_GROUNDED`` (-1) for a title that names no catalog item, ``NO_ENTRY`` (-2) past
the end of a shorter answer. Scoring (HR/NDCG..., ValidRatio, NonExist, Repeat, InHistory, ...) is
`recalign.eval.lists.score_lists`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recalign.eval.lists import NO_ENTRY, GeneratedLists


def ground_lists(title_lists: Sequence[Sequence[str]], grounder, k: int) -> GeneratedLists:
    """Ground the first k titles of every answer with one grounder call.

    Returns GeneratedLists(grounded LongTensor [U, k] with -1 = not grounded and -2 = no entry, n_outputs
    LongTensor [U] = the number of titles before truncation, for CorrectCount).
    """
    n_outputs = torch.tensor([len(t) for t in title_lists], dtype=torch.long)
    kept = n_outputs.clamp(max=k)
    flat = [title for titles in title_lists for title in titles[:k]]
    grounded = torch.full((len(title_lists), k), NO_ENTRY, dtype=torch.long)
    if flat:
        rows = torch.repeat_interleave(torch.arange(len(title_lists)), kept)
        cols = torch.arange(rows.shape[0]) - (torch.cumsum(kept, 0) - kept)[rows]
        grounded[rows, cols] = grounder.ground(flat)
    return GeneratedLists(grounded, n_outputs)


def ground_answers(answers: Sequence[str], grounder, k: int) -> GeneratedLists:
    """Parse every title of each answer (`recalign.llm.tasks.parse_titles`) and ground the first k of them."""
    from recalign.llm.tasks import parse_titles

    return ground_lists([parse_titles(a) for a in answers], grounder, k)  # all titles: CorrectCount
