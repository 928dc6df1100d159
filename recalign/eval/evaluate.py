"""The one evaluator: lists from a Recommender (scores) or a ListRecommender on a split part, scored by eval.lists."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
import pandas as pd
import torch

from recalign.data.dataset import Dataset, UserSequences
from recalign.data.sampling import candidate_lists, load_candidates, sample_negatives, save_candidates
from recalign.data.split import Split
from recalign.errors import ConfigError, DataError
from recalign.eval.beyond import catalog_genre_table, popularity
from recalign.eval.lists import GeneratedLists, ListInputs, ListRecommender, score_lists, users_sequences
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


def eval_users(eligible: np.ndarray, n_users: int | None = None, seed: int = 0,
               users: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """The evaluated users, ascending: `users` (each must be eligible), a seeded subset of n_users, or all."""
    eligible = np.asarray(eligible, dtype=np.int64)
    if users is not None:
        chosen = np.unique(np.asarray(users, dtype=np.int64))
        missing = np.setdiff1d(chosen, eligible)
        if len(missing):
            raise DataError(f"{len(missing)} requested users have no target in this split part "
                            f"(e.g. user {int(missing[0])})", field="users")
        return chosen
    if n_users is None or n_users >= len(eligible):
        return eligible
    if n_users < 1:
        raise ConfigError(f"eval.users: expected a positive number of users, got {n_users}")
    return np.sort(np.random.default_rng(seed).choice(eligible, size=int(n_users), replace=False))


def _score_lists(model: "Recommender", dataset: Dataset, history: UserSequences, users: np.ndarray,
                 relevant: torch.Tensor, k: int, protocol: str, n_negatives: int, seed: int, exclude_history: bool,
                 progress: bool, batch_size: int, candidates_path) -> torch.Tensor:
    """Top-k lists [U, k] of a score-based model: chunked full ranking, or ranking the sampled candidates."""
    score_fn = (lambda batch: model.score(batch, history))
    with torch.no_grad():
        factors = factor_embeddings(model, history) if protocol == "full" else None
        if factors is not None:  # factor model (e.g. BPR-MF): the blocked matmul path, same lists
            lists, _ = full_ranking_topk(factors[0], factors[1], history if exclude_history else None, users, k,
                                         progress=progress)
        elif protocol == "full":
            lists, _ = full_ranking(score_fn, users, history, k, exclude_history=exclude_history, chunk=batch_size,
                                    progress=progress)
        else:
            cands = _candidates(dataset, users, relevant, n_negatives, seed, candidates_path)
            lists, _ = sampled_ranking(score_fn, users, history, cands, k, exclude_history=exclude_history,
                                       chunk=batch_size, progress=progress)
    return lists


def _model_lists(model: ListRecommender, history: UserSequences, users: np.ndarray, k: int
                 ) -> tuple[torch.Tensor, GeneratedLists | None]:
    """(lists [U, <= k], the generated answers when the model returns them) of a list model."""
    with torch.no_grad():
        answer = model.recommend(users, history, k)
    generated = answer if isinstance(answer, GeneratedLists) else None
    lists = generated.lists() if generated is not None else torch.as_tensor(answer, dtype=torch.long)
    if lists.dim() != 2 or lists.shape[0] != len(users):
        raise DataError(f"{type(model).__name__}.recommend returned lists of shape {tuple(lists.shape)}; "
                        f"expected [{len(users)}, <= {k}]")
    return lists[:, :k], generated


def evaluate(
    model: Union["Recommender", ListRecommender],
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
    users: Sequence[int] | np.ndarray | None = None,
    n_users: int | None = None,
    keep: dict | None = None,
) -> dict:
    """Rank the users with a target in `part`, given `split.history(part)`; every list metric at every K.

    `model` is score-based (has `score(users, history)`: the chunked full-ranking fast path, or protocol="sampled"
    which ranks each user's targets among `n_negatives` seeded items the user never interacted with, saved to /
    reused from `candidates_path`) or a `ListRecommender` (`recommend(users, history, k)`: its own lists, full
    protocol only; `exclude_history` is then the model's business). Users: all with a target, `users` (a subset),
    or a seeded subset of `n_users` (same `seed` -> same users, whatever the model).
    Returns `eval.lists.score_lists` keys (hr/recall/precision/ndcg/mrr/map, coverage/div_ratio/or_ratio/avg_pop,
    mgu/dgu when items have categories, valid_ratio; the validity metrics of docs/metrics.md §2.4 for generated
    answers) plus n_users, n_eligible, n_removed (users with no target in `part`), protocol, part,
    exclude_history, k, ranking ("scores" or "lists") and the candidate seed for "sampled".
    `keep` (a dict) receives what the metrics were computed from, for paired comparisons later
    (`recalign.eval.claims`): users, lists [U, K], relevant, n_relevant, n_items.
    """
    ks, scores_model = _checked_settings(model, protocol, ks)
    history = dataset.sequences(split.history(part))
    eligible, relevant, counts = relevant_items(split.part(part), dataset.n_users)
    if len(eligible) == 0:
        raise DataError(f"split part {part!r} has no interactions to evaluate", field="part")
    chosen = eval_users(eligible, n_users, seed, users)
    rows = torch.from_numpy(np.searchsorted(eligible, chosen))
    relevant, counts = relevant[rows], counts[rows]
    generated = None
    if scores_model:
        lists = _score_lists(model, dataset, history, chosen, relevant, ks[-1], protocol, n_negatives, seed,
                             exclude_history, progress, batch_size, candidates_path)
    else:
        lists, generated = _model_lists(model, history, chosen, ks[-1])
    inputs = _list_inputs(dataset, split, history, chosen, lists, generated, relevant, counts, parity)
    if keep is not None:
        keep.update(users=torch.as_tensor(chosen, dtype=torch.long), lists=inputs.lists.clone(),
                    relevant=relevant.clone(), n_relevant=counts.clone(), n_items=torch.tensor(dataset.n_items))
    result: dict = score_lists(inputs, ks)
    result.update(_run_fields(dataset, eligible, chosen, protocol=protocol, part=part, exclude_history=exclude_history,
                              ks=ks, scores_model=scores_model, n_negatives=n_negatives, seed=seed, parity=parity))
    return result


def _checked_settings(model: Recommender | ListRecommender, protocol: str, ks: Sequence[int]
                      ) -> tuple[list[int], bool]:
    """(the sorted distinct cut-offs, whether the model is score-based); ConfigError for a bad protocol, bad
    cut-offs, a model with neither score nor recommend, or a list model under another protocol than "full"."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"eval.ks: expected positive integers, got {list(ks)}")
    scores_model = callable(getattr(model, "score", None))
    if not scores_model and not callable(getattr(model, "recommend", None)):
        raise ConfigError(f"{type(model).__name__}: a model needs score(users, history) or recommend(users, "
                          "history, k)")
    if not scores_model and protocol != "full":
        raise ConfigError(f"eval.protocol: a list model is scored on its own lists (protocol 'full'), "
                          f"not {protocol!r}")
    return ks, scores_model


def _list_inputs(dataset: Dataset, split: Split, history: UserSequences, chosen: np.ndarray, lists: torch.Tensor,
                 generated: GeneratedLists | None, relevant: torch.Tensor, counts: torch.Tensor,
                 parity: str | None) -> ListInputs:
    """What `score_lists` needs: the lists (or the generated answers), targets, popularity from the valid history,
    the users' histories and the catalog's genre table."""
    fields = dict(n_relevant=counts, parity=parity,
                  popularity=popularity(split.history("valid")["item_id"].to_numpy(), dataset.n_items),
                  history=users_sequences(history, chosen), genre_table=catalog_genre_table(dataset.item_categories()))
    if generated is not None:
        return ListInputs.from_generated(generated, relevant, dataset.n_items, **fields)
    return ListInputs(lists, relevant, dataset.n_items, **fields)


def _run_fields(dataset: Dataset, eligible: np.ndarray, chosen: np.ndarray, *, protocol: str, part: str,
                exclude_history: bool, ks: list[int], scores_model: bool, n_negatives: int, seed: int,
                parity: str | None) -> dict:
    """The keys that describe the evaluation, added after the metrics (in this order)."""
    fields = {
        "n_users": int(len(chosen)),
        "n_eligible": int(len(eligible)),
        "n_removed": int(dataset.n_users - len(eligible)),
        "protocol": protocol,
        "part": part,
        "exclude_history": bool(exclude_history),
        "k": ks,
        "ranking": "scores" if scores_model else "lists",
    }
    if protocol == "sampled":
        fields.update({"n_negatives": int(n_negatives), "candidate_seed": int(seed)})
    if parity is not None:
        fields["parity"] = parity
    return fields
