"""TRD: Top-aware Recommender Distillation (Information Sciences 576, 2021) on recalign's blocks.

The algorithm box, as `run_trd` executes it:

    1. Split all interactions globally by time: train1 60% | train2 10% | validate 10% | test 20%.
    2. Train a teacher (BPR-MF by default, any recalign teacher works) on train1.
    3. For every user of a later part, build a candidate pool (protocol `trd_temporal`, metrics.md section 3):
       the user's items in that part + seeded random items the user has not interacted with before, up to
       `cand_num`; the teacher ranks the pool -> the teacher's list.
    4. Train the DQN student on the train2 users: state = user + last 5 hit items (start: train1's last 5),
       actions = a sliding window over the teacher's list, reward = 1/log2(t+1) on a hit (train2 items).
    5. After every epoch, re-rank the validation users' lists greedily and keep the epoch with the best
       validation NDCG@10 (the original never reads the validation part and effectively tunes on test).
    6. Test: re-rank the test users' lists (start state: the last 5 items before test) and compare the student
       with the teacher on the same users and pools with the standard metrics.

Paper-vs-recalign differences are listed in systems.md section 4.4; the ones decided here:
- inference is deterministic (dropout off) and, by default, uses no test labels: the state stays the user's
  history. `oracle_test_transitions=True` reproduces the original, whose test-time state follows test hits.
- the daisyRec metrics are available only as `parity="daisy"`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.data.dataset import Dataset
from recalign.errors import ConfigError
from recalign.methods.trd.dqn import DQNConfig, DQNReranker, RerankEpisodes
from recalign.stages import fill_seeds
from recalign.threads import torch_threads

if TYPE_CHECKING:
    from recalign.data.split import Split
    from recalign.teachers.base import Recommender

PARTS = ("train2", "valid", "test")


class TRDConfig(BaseModel):
    """Settings of a TRD run (also the `trd` recipe stage's params)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field("bprmf", description="name of an earlier `teacher` stage of the recipe (trained on the "
                                              "split's train part = train1), or a teacher model name "
                                              "(bprmf, sasrec, popularity) that this stage trains on train1")
    teacher_source: Literal["auto", "stage", "model"] = Field(
        "auto", description="how to read `teacher`: 'stage' = an earlier stage, 'model' = a model trained here "
                            "on train1, 'auto' = a stage when one has that name, else a model")
    teacher_params: dict = Field(default_factory=dict, description="config of a teacher this stage trains "
                                                                   "(ignored when `teacher` names a stage)")
    cand_num: int = Field(1000, ge=1, description="candidate pool size per user (positives + random negatives)")
    candidate_seed: int | None = Field(None, description="seed of the random pool items (default: recipe seed)")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20], description="cut-offs of the reported metrics; "
                                                                              "the student builds max(ks) picks")
    select_metric: str = Field("ndcg@10", description="validation metric that picks the student's epoch")
    parity: Literal["standard", "daisy"] = Field("standard", description="'daisy': the original's daisyRec "
                                                                         "metrics (non-standard, metrics.md 4)")
    oracle_test_transitions: bool = Field(False, description="let test hits update the state as the original "
                                                             "does (leaks test labels; parity only)")
    fractions: list[float] = Field(default_factory=lambda: [0.6, 0.1, 0.1, 0.2],
                                   description="train1/train2/valid/test fractions of the global temporal split "
                                               "the stage makes itself when the recipe's split is another kind")
    embedding_dim: int = Field(32, ge=1, description="embedding size when the teacher has no user/item "
                                                     "embeddings to copy (then they start as N(0, 0.01))")
    dqn: DQNConfig = Field(default_factory=DQNConfig, description="the student's settings (rl/dqn.py)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads for the whole stage: teacher, pools, "
                                "student (None: recalign's default, 1); the metrics do not depend on it")


# ---- step 2: the teacher ---------------------------------------------------------------------------

def train_teacher(name: str, dataset: Dataset, split: "Split", params: dict, seed: int,
                  progress: bool = False) -> "Recommender":
    """Train teacher model `name` on train1 (the split's train part); the validation part may early-stop it."""
    from recalign.teachers.registry import get_teacher

    model = get_teacher(name)(**{"seed": seed, **params})
    return model.fit(dataset, split.train, split.valid, progress=progress, valid_history=split.history("valid"))


# ---- step 3: candidate pools and teacher lists ------------------------------------------------------

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


# ---- metrics ----------------------------------------------------------------------------------------

def rerank_metrics(lists: torch.Tensor, relevant: list[set[int]], ks: list[int], parity: str = "standard") -> dict:
    """HR/NDCG/... @K of ranked lists with multiple positives per user, via the shared evaluator."""
    from recalign.eval.metrics import ranking_metrics

    return ranking_metrics(lists, relevant, ks, parity=None if parity == "standard" else parity)


# ---- steps 4-6: the whole run -------------------------------------------------------------------------

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


def student_embeddings(teacher: "Recommender", dataset: Dataset, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(user, item) embeddings copied from the teacher, or N(0, 0.01) when it has none (e.g. popularity)."""
    users, items = getattr(teacher, "user_embeddings_", None), getattr(teacher, "item_embeddings_", None)
    if users is not None and items is not None:
        return users.detach().float(), items.detach().float()
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(dataset.n_users, dim, generator=generator) * 0.01,
            torch.randn(dataset.n_items, dim, generator=generator) * 0.01)


def run_trd(dataset: Dataset, split: "Split", teacher: "Recommender", config: TRDConfig, seed: int = 0,
            progress: bool = False, log: Callable[[str], None] | None = None) -> TRDResult:
    """Steps 3-6 of the algorithm box for an already trained teacher."""
    with torch_threads(config.threads):
        return _run_trd(dataset, split, teacher, config, seed, progress, log)


def dqn_settings(config: TRDConfig, seed: int) -> DQNConfig:
    """The student's DQN settings: the one seed rule (`dqn.seed` defaults to `seed`) and the stage's threads."""
    dqn = fill_seeds(config.dqn, seed)
    return dqn if dqn.threads is not None else dqn.model_copy(update={"threads": config.threads})


def _run_trd(dataset: Dataset, split: "Split", teacher: "Recommender", config: TRDConfig, seed: int,
             progress: bool, log: Callable[[str], None] | None) -> TRDResult:
    dqn_config = dqn_settings(config, seed)
    depth = max(*config.ks, dqn_config.list_length)  # the student's list; metrics cut it at each K
    pool_seed = fill_seeds(config, seed).candidate_seed
    started = time.perf_counter()
    lists = {part: teacher_lists(teacher, dataset, split, part, config.cand_num, dqn_config.state_len, pool_seed)
             for part in PARTS}
    seconds = {"teacher_lists": time.perf_counter() - started}
    train, valid, test = lists["train2"], lists["valid"], lists["test"]
    if len(train.episodes) == 0 or len(valid.episodes) == 0 or len(test.episodes) == 0:
        raise ConfigError("trd: train2, valid and test each need at least one user; check split.fractions")

    def inference_view(part: PartLists) -> RerankEpisodes:
        return part.episodes if config.oracle_test_transitions else without_labels(part.episodes)

    def validation_score(model: DQNReranker) -> float:
        picked = model.rerank(inference_view(valid), length=depth)
        return rerank_metrics(picked, valid.relevant, config.ks, config.parity)[config.select_metric]

    user_emb, item_emb = student_embeddings(teacher, dataset, config.embedding_dim, seed)
    student = DQNReranker(user_emb, item_emb, dqn_config)
    started = time.perf_counter()
    student.fit(train.episodes, validate=validation_score, progress=progress, log=log,
                valid_metric=config.select_metric)
    seconds["student_train"] = time.perf_counter() - started

    started = time.perf_counter()
    student_valid_lists = student.rerank(inference_view(valid), length=depth)
    student_test_lists = student.rerank(inference_view(test), length=depth)
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
