"""TRD: Top-aware Recommender Distillation (Information Sciences 576, 2021) on recalign's blocks.

A classical teacher ranks items for each user; a DQN student (`recalign.methods.trd.dqn`) re-ranks the top of the
teacher's list: it picks one item at a time from a sliding window over the list (state = the user + the last 5
hit items, reward = 1/log2(t+1) for a hit at list position t). The `trd` stage runs one of two protocols
(docs/protocols.md); every function named below lives in this module unless a module is given, and each one is
callable without a run folder (the recipe adapter is `recalign.methods.trd.stage`).

The algorithm box, protocol `recipe` (the default; the stage calls `fit_on_validation`, then scores the
returned `RerankedLists` with the recipe's evaluator):

    R1. The recipe's split (train / valid / test, any kind: leave-one-out, temporal, ...).
    R2. The teacher: an earlier `teacher` stage trained on train, or `train_teacher` on train.
    R3. For every validation user, the teacher's top-`cand_num` list of the catalog, history excluded; labels =
        the user's validation items, start state = the last `state_len` items before validation
        (`RerankedLists.episodes`).
    R4. A seeded `SELECT_FRACTION` (10%) of the validation users is held out to pick the epoch; the student
        learns from the other 90% (`select_rows`).
    R5. Student embeddings copied from the teacher (`student_embeddings`), settings `dqn_settings`; train the DQN
        student on the 90%'s episodes (`DQNReranker.fit`, same state, actions and reward as T5).
    R6. After every epoch, re-rank the held-out users' lists without labels and keep the epoch with the best
        `select_metric` (`epoch_selector`, `rerank_metrics`).
    R7. Test: for every recipe test user, the teacher's top-`cand_num` list given the history before test,
        re-ranked by the student from that history alone, no labels (`RerankedLists.recommend`). The recipe's
        evaluator scores these lists and the teacher's on the same users (`stage.run_recipe_stage`;
        docs/metrics.md).

The algorithm box, protocol `trd_temporal` (the paper's; `run_trd` runs T3-T7 for a trained teacher):

    T1. Split all interactions globally by time: train1 60% | train2 10% | validate 10% | test 20%
        (`recalign.data.split.global_temporal_split`; the stage uses the recipe's split when it is global
        temporal, else its own from `fractions`: `stage.stage_split`).
    T2. Train a teacher (BPR-MF by default, any recalign teacher works) on train1 (`train_teacher`), or take an
        earlier `teacher` stage.
    T3. For every user of a later part, build a candidate pool (docs/metrics.md section 3): the user's items in
        that part + seeded random items the user has not interacted with before, up to `cand_num`
        (`sample_pools`); the teacher ranks the pool -> the teacher's list (`teacher_lists`, `temporal_lists`).
    T4. Student embeddings copied from the teacher (`student_embeddings`), settings `dqn_settings`.
    T5. Train the DQN student on the train2 users: state = user + last 5 hit items (start: train1's last 5),
        actions = a sliding window over the teacher's list, reward = 1/log2(t+1) on a hit (train2 items)
        (`DQNReranker.fit`).
    T6. After every epoch, re-rank the validation users' lists greedily and keep the epoch with the best
        validation NDCG@10 (`epoch_selector`; the original never reads the validation part and effectively tunes
        on test).
    T7. Test: re-rank the test users' lists (start state: the last 5 items before test) and compare the student
        with the teacher on the same users and pools with the standard metrics (`rerank_metrics`, `TRDResult`).

Paper-vs-recalign differences are listed in docs/systems/trd.md; the ones decided here:
- inference is deterministic (dropout off) and, by default, uses no test labels: the state stays the user's
  history. `oracle_test_transitions=True` reproduces the original, whose test-time state follows test hits
  (`inference_view`; `trd_temporal` only).
- the daisyRec metrics are available only as `parity="daisy"` (`trd_temporal` only; docs/metrics.md section 4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import torch

from recalign.data.dataset import Dataset
from recalign.errors import ConfigError
from recalign.methods.trd.config import DQNConfig, TRDConfig
from recalign.methods.trd.dqn import DQNReranker, RerankEpisodes
from recalign.stages import fill_seeds
from recalign.threads import torch_threads

if TYPE_CHECKING:
    from recalign.data.split import Split
    from recalign.teachers.base import Recommender

PARTS = ("train2", "valid", "test")
SELECT_FRACTION = 0.1  # share of the validation users that picks the student's epoch (never the test part)


# ---- steps R2 / T2: the teacher ------------------------------------------------------------------

def train_teacher(name: str, dataset: Dataset, split: "Split", params: dict, seed: int,
                  progress: bool = False) -> "Recommender":
    """Train teacher model `name` on train1 (the split's train part); the validation part may early-stop it."""
    from recalign.teachers.registry import get_teacher

    model = get_teacher(name)(**{"seed": seed, **params})
    return model.fit(dataset, split.train, split.valid, progress=progress, valid_history=split.history("valid"))


# ---- step T3: candidate pools and teacher lists -----------------------------------------------------

@dataclass
class PartLists:
    """The teacher's lists for one part's users, ready for the student."""

    part: str
    episodes: RerankEpisodes  # with labels = the user's items in this part
    relevant: list[set[int]]  # Rel_u: the user's items in this part
    n_cold: int               # users without train1 interactions (the teacher never saw them)


def part_frame(split: "Split", part: str) -> pd.DataFrame:
    """The interactions of train2, valid or test."""
    if part == "train2":
        if "train2" not in split.extra:
            raise ConfigError("trd needs split.kind: global_temporal (train1 / train2 / valid / test)")
        return split.extra["train2"]
    return split.valid if part == "valid" else split.test


def part_history(split: "Split", part: str) -> pd.DataFrame:
    """Everything before the part: train1 for train2, train1 + train2 for valid, + valid for test."""
    return split.train if part == "train2" else split.history(part)


def sample_pools(positives: torch.Tensor, seen: torch.Tensor, cand_num: int, generator: torch.Generator,
                 chunk: int = 512) -> torch.Tensor:
    """Candidate pools: all positives + uniform random items neither positive nor seen, up to `cand_num` per row.

    positives, seen: BoolTensor [U, n_items]. Returns LongTensor [U, C] (ascending item ids, -1 padding),
    C = max(cand_num, most positives of a row), at most the catalog size.
    """
    n_users, n_items = positives.shape
    width = min(max(cand_num, int(positives.sum(1).max())) if n_users else cand_num, n_items)
    pools = torch.full((n_users, width), -1, dtype=torch.long)
    for start in range(0, n_users, chunk):
        pos, blocked = positives[start:start + chunk], positives[start:start + chunk] | seen[start:start + chunk]
        keys = torch.rand(pos.shape, generator=generator).masked_fill(blocked, 2.0)
        wanted = (cand_num - pos.sum(1)).clamp(min=0).minimum((~blocked).sum(1))
        rank = torch.empty_like(keys, dtype=torch.long).scatter_(
            1, keys.argsort(dim=1), torch.arange(n_items).expand_as(keys).contiguous())
        member = pos | (rank < wanted.unsqueeze(1))
        # Members first, in ascending item id (stable sort of the "not member" flag).
        order = (~member).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
        counts = member.sum(1, keepdim=True)
        pools[start:start + chunk] = torch.where(torch.arange(width) < counts, order, -1)
    return pools


def item_matrix(frame: pd.DataFrame, users: np.ndarray, n_items: int) -> torch.Tensor:
    """BoolTensor [len(users), n_items]: row r marks the items of users[r] in `frame`."""
    row_of = pd.Series(np.arange(len(users)), index=users)
    frame = frame[frame["user_id"].isin(row_of.index)]
    matrix = torch.zeros(len(users), n_items, dtype=torch.bool)
    rows = torch.from_numpy(np.array(row_of[frame["user_id"]], dtype=np.int64))
    matrix[rows, torch.from_numpy(np.array(frame["item_id"], dtype=np.int64))] = True
    return matrix


def teacher_lists(teacher: "Recommender", dataset: Dataset, split: "Split", part: str, cand_num: int,
                  state_len: int, seed: int) -> PartLists:
    """Pools for the part's users, ranked by the teacher; start states = the last `state_len` items before."""
    frame = part_frame(split, part)
    history_frame = part_history(split, part)
    users = np.sort(frame["user_id"].unique())
    positives = item_matrix(frame, users, dataset.n_items)
    seen = item_matrix(history_frame, users, dataset.n_items)
    # One generator per part, so the test pools do not depend on the sizes of the train2/valid parts.
    generator = torch.Generator().manual_seed(seed * 1000 + PARTS.index(part))
    pools = sample_pools(positives, seen, cand_num, generator)
    history = dataset.sequences(history_frame)
    items, scores = teacher.recommend(users, history, k=pools.shape[1], candidates=pools, exclude_history=False)
    valid = items >= 0
    relevant = positives.gather(1, items.clamp(min=0)) & valid
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    states = history.padded(users, state_len, pad=dataset.n_items)
    train1_users = set(split.train["user_id"].unique().tolist())
    episodes = RerankEpisodes(users=torch.as_tensor(users), candidates=items, relevant=relevant,
                              teacher_scores=scores.float(), start_states=states)
    relevant_sets = [set(frame_items) for frame_items in frame.groupby("user_id")["item_id"].agg(list).loc[users]]
    return PartLists(part=part, episodes=episodes, relevant=relevant_sets,
                     n_cold=sum(int(u) not in train1_users for u in users))


def without_labels(episodes: RerankEpisodes) -> RerankEpisodes:
    """The same episodes with the labels hidden (what the student may see at inference)."""
    return RerankEpisodes(episodes.users, episodes.candidates, None, episodes.teacher_scores, episodes.start_states)


def inference_view(part: PartLists, oracle_test_transitions: bool) -> RerankEpisodes:
    """What the student sees when it re-ranks a part: no labels, unless `oracle_test_transitions` lets hits move
    the state as in the original."""
    return part.episodes if oracle_test_transitions else without_labels(part.episodes)


def temporal_lists(teacher: "Recommender", dataset: Dataset, split: "Split", cand_num: int, state_len: int,
                   seed: int) -> dict[str, PartLists]:
    """Step T3 for every part (train2, valid, test); each part needs at least one user."""
    lists = {part: teacher_lists(teacher, dataset, split, part, cand_num, state_len, seed) for part in PARTS}
    if any(len(lists[part].episodes) == 0 for part in PARTS):
        raise ConfigError("trd: train2, valid and test each need at least one user; check split.fractions")
    return lists


# ---- step R3 and R7: the teacher's top lists under the recipe protocol ------------------------------------------

class RerankedLists:
    """TRD as a `recalign.eval.lists.ListRecommender`: the teacher's top-`cand_num` list (history excluded), re-ranked
    by the DQN student from the user's history (no labels)."""

    def __init__(self, teacher: "Recommender", student: DQNReranker, cand_num: int, exclude_history: bool = True):
        self.teacher, self.student, self.cand_num, self.exclude_history = teacher, student, cand_num, exclude_history

    def episodes(self, users: np.ndarray, histories, relevant: pd.DataFrame | None = None) -> RerankEpisodes:
        """The teacher's lists as episodes; labels = the users' items in `relevant` (None: inference)."""
        users = np.asarray(users, dtype=np.int64)
        n_items = histories.n_items
        items, scores = self.teacher.recommend(users, histories, k=min(self.cand_num, n_items),
                                               exclude_history=self.exclude_history)
        valid = items >= 0
        labels = None
        if relevant is not None:
            labels = item_matrix(relevant, users, n_items).gather(1, items.clamp(min=0)) & valid
        states = histories.padded(users, self.student.config.state_len, pad=n_items)
        return RerankEpisodes(users=torch.as_tensor(users), candidates=items, relevant=labels,
                              teacher_scores=torch.where(valid, scores, torch.zeros_like(scores)).float(),
                              start_states=states)

    def recommend(self, users: np.ndarray, histories, k: int) -> torch.Tensor:
        """Top-k re-ranked lists [U, k] (-1 where the teacher's list runs out)."""
        length = max(k, self.student.config.list_length)
        return self.student.rerank(self.episodes(users, histories), length=length)[:, :k]


def select_rows(n_users: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step R4: (rows that pick the epoch, rows the student learns from), a seeded `SELECT_FRACTION` split of
    `n_users` validation users (at least one selection row), each ascending."""
    order = torch.randperm(n_users, generator=torch.Generator().manual_seed(seed))
    n_select = max(1, int(round(SELECT_FRACTION * n_users)))
    return order[:n_select].sort().values, order[n_select:].sort().values


# ---- steps R5-R6 / T4-T6: the student and the epoch it keeps ----------------------------------------

def rerank_metrics(lists: torch.Tensor, relevant: list[set[int]], ks: list[int], parity: str = "standard") -> dict:
    """HR/NDCG/... @K of ranked lists with multiple positives per user, via the shared evaluator."""
    from recalign.eval.metrics import ranking_metrics

    return ranking_metrics(lists, relevant, ks, parity=None if parity == "standard" else parity)


def student_embeddings(teacher: "Recommender", dataset: Dataset, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(user, item) embeddings copied from the teacher, or N(0, 0.01) when it has none (e.g. popularity)."""
    users, items = getattr(teacher, "user_embeddings_", None), getattr(teacher, "item_embeddings_", None)
    if users is not None and items is not None:
        return users.detach().float(), items.detach().float()
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(dataset.n_users, dim, generator=generator) * 0.01,
            torch.randn(dataset.n_items, dim, generator=generator) * 0.01)


def dqn_settings(config: TRDConfig, seed: int) -> DQNConfig:
    """The student's DQN settings: the one seed rule (`dqn.seed` defaults to `seed`) and the stage's threads."""
    dqn = fill_seeds(config.dqn, seed)
    return dqn if dqn.threads is not None else dqn.model_copy(update={"threads": config.threads})


def epoch_selector(episodes: RerankEpisodes, relevant: list[set[int]], ks: list[int], metric: str, depth: int,
                   parity: str = "standard") -> Callable[[DQNReranker], float]:
    """Steps R6 / T6: the `validate` callback of `DQNReranker.fit`, the `metric` of the student's `depth`-long
    re-ranked lists of `episodes` against `relevant` (higher is better)."""

    def score(model: DQNReranker) -> float:
        picked = model.rerank(episodes, length=depth)
        return rerank_metrics(picked, relevant, ks, parity)[metric]

    return score


def student_depth(config: TRDConfig, dqn_config: DQNConfig) -> int:
    """Length of the student's lists: the largest cut-off or `list_length`; metrics cut them at each K."""
    return max(*config.ks, dqn_config.list_length)


# ---- protocol trd_temporal: steps T3-T7 -----------------------------------------------------------------------

@dataclass
class TRDResult:
    """Teacher and student metrics on validation and test, the test lists and the student's training log."""

    teacher_valid: dict
    teacher_test: dict
    student_valid: dict
    student_test: dict
    student: DQNReranker
    test_users: torch.Tensor
    test_relevant: list[set[int]]
    test_pools: torch.Tensor  # the teacher's full ranked test pools [U, C] (-1 padding)
    teacher_test_lists: torch.Tensor
    student_test_lists: torch.Tensor
    counts: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def run_trd(dataset: Dataset, split: "Split", teacher: "Recommender", config: TRDConfig, seed: int = 0,
            progress: bool = False, log: Callable[[str], None] | None = None) -> TRDResult:
    """Steps T3-T7 of the algorithm box for an already trained teacher."""
    with torch_threads(config.threads):
        return _run_trd(dataset, split, teacher, config, seed, progress, log)


def _run_trd(dataset: Dataset, split: "Split", teacher: "Recommender", config: TRDConfig, seed: int,
             progress: bool, log: Callable[[str], None] | None) -> TRDResult:
    """`run_trd` under the configured threads; the step of the box is marked on each line."""
    dqn_config = dqn_settings(config, seed)
    depth = student_depth(config, dqn_config)
    pool_seed = fill_seeds(config, seed).candidate_seed
    started = time.perf_counter()
    lists = temporal_lists(teacher, dataset, split, config.cand_num, dqn_config.state_len, pool_seed)  # T3
    seconds = {"teacher_lists": time.perf_counter() - started}
    train, valid = lists["train2"], lists["valid"]
    validate = epoch_selector(inference_view(valid, config.oracle_test_transitions), valid.relevant, config.ks,
                              config.select_metric, depth, config.parity)  # T6
    user_emb, item_emb = student_embeddings(teacher, dataset, config.embedding_dim, seed)  # T4
    student = DQNReranker(user_emb, item_emb, dqn_config)
    started = time.perf_counter()
    student.fit(train.episodes, validate=validate, progress=progress, log=log,  # T5 (+ T6 after every epoch)
                valid_metric=config.select_metric)
    seconds["student_train"] = time.perf_counter() - started
    return temporal_result(student, lists, config, depth, seconds)  # T7


def temporal_result(student: DQNReranker, lists: dict[str, PartLists], config: TRDConfig, depth: int,
                    seconds: dict) -> TRDResult:
    """Step T7: the student re-ranks the validation and test lists; student and teacher scored on the same pools."""
    train, valid, test = lists["train2"], lists["valid"], lists["test"]
    started = time.perf_counter()
    student_valid_lists = student.rerank(inference_view(valid, config.oracle_test_transitions), length=depth)
    student_test_lists = student.rerank(inference_view(test, config.oracle_test_transitions), length=depth)
    seconds["student_rerank"] = time.perf_counter() - started
    teacher_test_lists = test.episodes.candidates[:, :depth]
    return TRDResult(
        teacher_valid=rerank_metrics(valid.episodes.candidates[:, :depth], valid.relevant, config.ks, config.parity),
        teacher_test=rerank_metrics(teacher_test_lists, test.relevant, config.ks, config.parity),
        student_valid=rerank_metrics(student_valid_lists, valid.relevant, config.ks, config.parity),
        student_test=rerank_metrics(student_test_lists, test.relevant, config.ks, config.parity),
        student=student, test_users=test.episodes.users, test_relevant=test.relevant,
        test_pools=test.episodes.candidates, teacher_test_lists=teacher_test_lists,
        student_test_lists=student_test_lists, seconds=seconds,
        counts={"n_train_users": len(train.episodes), "n_valid_users": len(valid.episodes),
                "n_users": len(test.episodes), "n_users_cold": test.n_cold})


# ---- protocol recipe: steps R3-R6 (R7 is the recipe's evaluator on the returned lists) ----------------------------

def fit_on_validation(dataset: Dataset, split: "Split", teacher: "Recommender", config: TRDConfig, seed: int,
                      progress: bool = False, log: Callable[[str], None] | None = None
                      ) -> tuple[DQNReranker, RerankedLists, dict, dict]:
    """Train the student on the validation part's episodes (state = train history) of a seeded 90% of the users and
    keep the epoch with the best `select_metric` on the other 10%; returns (student, lists model, counts, seconds).

    The lists model re-ranks any user's teacher list from the history it is given (step R7)."""
    dqn_config = dqn_settings(config, seed)
    users = np.sort(split.valid["user_id"].unique()).astype(np.int64)
    if len(users) < 2:
        raise ConfigError("trd: the validation part needs at least two users (train and epoch selection)")
    user_emb, item_emb = student_embeddings(teacher, dataset, config.embedding_dim, seed)
    student = DQNReranker(user_emb, item_emb, dqn_config)
    lists = RerankedLists(teacher, student, config.cand_num)
    started = time.perf_counter()
    episodes = lists.episodes(users, dataset.sequences(split.history("valid")), relevant=split.valid)  # R3
    seconds = {"teacher_lists": time.perf_counter() - started}
    selection, training = select_rows(len(users), seed)  # R4
    by_user = split.valid.groupby("user_id")["item_id"].agg(set)
    select_relevant = [by_user[int(u)] for u in users[selection.numpy()]]
    validate = epoch_selector(without_labels(episodes.subset(selection)), select_relevant, config.ks,
                              config.select_metric, student_depth(config, dqn_config))  # R6
    started = time.perf_counter()
    student.fit(episodes.subset(training), validate=validate, progress=progress, log=log,  # R5 (+ R6 per epoch)
                valid_metric=config.select_metric)
    seconds["student_train"] = time.perf_counter() - started
    counts = {"n_train_users": len(training), "n_select_users": len(selection)}
    return student, lists, counts, seconds
