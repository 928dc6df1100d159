"""The one evaluator: rank with a Recommender on a split part, then the metrics of reference/metrics.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch

from recalign.data.dataset import Dataset, UserSequences
from recalign.data.sampling import candidate_lists, load_candidates, sample_negatives, save_candidates
from recalign.data.split import Split
from recalign.errors import ConfigError, DataError
from recalign.eval.beyond import avg_popularity, coverage, popularity
from recalign.eval.metrics import ranking_metrics
from recalign.eval.ranking import full_ranking, full_ranking_topk, sampled_ranking

if TYPE_CHECKING:
    from recalign.teachers.base import Recommender

PROTOCOLS = ("full", "sampled")


def relevant_items(frame: pd.DataFrame, n_users: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(users with >= 1 item in `frame`, padded relevant items [U, R] (-1 = none), |Rel_u| [U])."""
    seqs = UserSequences.from_interactions(frame, n_users, 0)
    lengths = seqs.lengths()
    users = np.flatnonzero(lengths > 0)
    width = int(lengths.max()) if len(users) else 1
    # padded() keeps the last `width` items, i.e. all of them (left-padding does not matter for a set).
    padded = seqs.padded(users, max(width, 1), pad=-1)
    return users, padded, torch.from_numpy(_distinct_counts(padded))


def _distinct_counts(padded: torch.Tensor) -> np.ndarray:
    values = torch.sort(padded, dim=1).values
    distinct = torch.ones_like(values, dtype=torch.bool)
    distinct[:, 1:] = values[:, 1:] != values[:, :-1]
    return (distinct & (values >= 0)).sum(dim=1).numpy()


def _candidates(dataset: Dataset, users: np.ndarray, relevant: torch.Tensor, n_negatives: int, seed: int,
                path: str | os.PathLike | None) -> torch.Tensor:
    """[targets..., n negatives] per user, reused from `path` when it holds the same users, targets and seed."""
    if path is not None and Path(path).is_file():
        saved_users, saved, saved_seed = load_candidates(path)
        width = relevant.shape[1]
        if saved_seed == seed and torch.equal(saved_users, torch.from_numpy(users)) \
                and saved.shape[1] == width + n_negatives and torch.equal(saved[:, :width], relevant):
            return saved
    if relevant.shape[1] == 1:
        cands = candidate_lists(dataset, None, users, relevant[:, 0], n_negatives, seed)
    else:
        # Several targets (e.g. a temporal test part): all of them + n negatives never interacted with.
        negatives = sample_negatives(dataset, None, users, n_negatives, seed, exclude=relevant)
        cands = torch.cat([relevant, negatives], dim=1)
    if path is not None:
        save_candidates(path, torch.from_numpy(users), cands, seed)
    return cands


def factor_embeddings(model: "Recommender", history: UserSequences) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(user, item) embeddings when the model's scores are their dot products (checked on a few users)."""
    users_emb = getattr(model, "user_embeddings_", None)
    items_emb = getattr(model, "item_embeddings_", None)
    if not isinstance(users_emb, torch.Tensor) or not isinstance(items_emb, torch.Tensor):
        return None
    probe = np.arange(min(4, users_emb.shape[0]))
    expected = users_emb[torch.from_numpy(probe)].detach().float() @ items_emb.detach().float().T
    actual = model.score(probe, history).detach().float()
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-5, atol=1e-6):
        return None
    return users_emb, items_emb


def evaluate(
    model: "Recommender",
    dataset: Dataset,
    split: Split,
    part: str = "test",
    ks: Sequence[int] = (1, 5, 10, 20),
    protocol: str = "full",
    n_negatives: int = 100,
    seed: int = 0,
    exclude_history: bool = True,
    progress: bool = True,
    parity: str | None = None,
    batch_size: int = 1024,
    candidates_path: str | os.PathLike | None = None,
) -> dict:
    """Rank every user with a target in `part`, given `split.history(part)`; metrics at every K.

    protocol="full" ranks the whole catalog; "sampled" ranks each user's targets among `n_negatives` items the
    user never interacted with (seeded; saved to / reused from `candidates_path` when given).
    Returns hr/recall/precision/ndcg/mrr/map/coverage/avgpop "@K" plus n_users, n_removed (users with no
    target in `part`), protocol, part, exclude_history, k, and the candidate seed for "sampled".
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"eval.ks: expected positive integers, got {list(ks)}")
    targets = split.part(part)
    history = dataset.sequences(split.history(part))
    users, relevant, counts = relevant_items(targets, dataset.n_users)
    if len(users) == 0:
        raise DataError(f"split part {part!r} has no interactions to evaluate", field="part")
    score_fn = (lambda batch: model.score(batch, history))
    with torch.no_grad():
        factors = factor_embeddings(model, history) if protocol == "full" else None
        if factors is not None:  # factor model (e.g. BPR-MF): the blocked matmul path, same lists
            lists, _ = full_ranking_topk(factors[0], factors[1], history if exclude_history else None, users,
                                         max(ks), progress=progress)
        elif protocol == "full":
            lists, _ = full_ranking(score_fn, users, history, max(ks), exclude_history=exclude_history,
                                    chunk=batch_size, progress=progress)
        else:
            cands = _candidates(dataset, users, relevant, n_negatives, seed, candidates_path)
            lists, _ = sampled_ranking(score_fn, users, history, cands, max(ks), exclude_history=exclude_history,
                                       chunk=batch_size, progress=progress)
    result: dict = ranking_metrics(lists, relevant, ks, n_relevant=counts, parity=parity)
    pop = popularity(split.history("valid")["item_id"].to_numpy(), dataset.n_items)
    for k in ks:
        result[f"coverage@{k}"] = coverage(lists, k, dataset.n_items)
        result[f"avgpop@{k}"] = avg_popularity(lists, k, pop)
    result.update({
        "n_users": int(len(users)),
        "n_removed": int(dataset.n_users - len(users)),
        "protocol": protocol,
        "part": part,
        "exclude_history": bool(exclude_history),
        "k": ks,
    })
    if protocol == "sampled":
        result.update({"n_negatives": int(n_negatives), "candidate_seed": int(seed)})
    if parity is not None:
        result["parity"] = parity
    return result
