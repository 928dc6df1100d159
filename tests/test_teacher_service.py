"""TeacherService: top-K over candidates / +C / -C / all minus history and ranks, by hand and against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recalign.data.dataset import UserSequences, build_dataset
from recalign.data.sources.synthetic import SyntheticSourceConfig, generate_synthetic
from recalign.errors import RecalignError, RequestError
from recalign.teachers.bprmf import BPRMF
from recalign.teachers.popularity import Popularity
from recalign.teachers.sasrec import SASRec
from recalign.teachers.service import TeacherService

from conftest import TINY_INTERACTIONS, TINY_ITEMS

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

# tiny dataset: Mystery = {0, 1, 3}, Romance = {2, 3, 4}; popularity counts [2, 2, 3, 2, 2]


@pytest.fixture(scope="module")
def popularity() -> TeacherService:
    dataset = build_dataset(TINY_INTERACTIONS, items=TINY_ITEMS, name="tiny", source="test")
    return TeacherService(Popularity().fit(dataset, dataset.interactions, progress=False))


@pytest.fixture(scope="module")
def synthetic():
    return generate_synthetic(SyntheticSourceConfig(n_users=120, n_items=40, n_categories=4, min_length=5,
                                               max_length=15, seed=3))


@pytest.fixture(scope="module")
def sasrec(synthetic) -> TeacherService:
    teacher = SASRec(epochs=2, dim=16, max_len=20, batch_size=64, seed=0)
    return TeacherService(teacher.fit(synthetic, synthetic.interactions, progress=False))


def test_popularity_by_hand(popularity):
    """Counts 3 for item 2, 2 for the rest; ties go to the smaller id."""
    top = popularity.topk([[0], [2, 3], [], [1]], 3, categories=["+Romance", "-Romance", None, "-Mystery"])
    assert top.tolist() == [[2, 3, 4],    # Romance minus history {0}
                            [0, 1, -1],   # not Romance {0, 1} minus history {2, 3}; one pad
                            [2, 0, 1],    # everything
                            [2, 4, -1]]   # not Mystery {2, 4}
    top = popularity.topk([[0], [2, 3]], 2, candidates=[[4, 1, 0], None])
    assert top.tolist() == [[1, 4], [0, 1]]
    assert popularity.topk([[2]], 2, exclude_history=False).tolist() == [[2, 0]]
    assert popularity.topk([[2]], 7).tolist() == [[0, 1, 3, 4, -1, -1, -1]]  # k above the catalog size


def test_popularity_ranks_by_hand(popularity):
    """Order by (count desc, id asc) is 2, 0, 1, 3, 4; history is not excluded; short rows pad with -1."""
    ranks = popularity.ranks([[0], [2]], [[0, 2, 4], [1]])
    assert ranks.tolist() == [[1, 0, 4], [2, -1, -1]]


def _brute_scores(service: TeacherService, history: list[int]) -> torch.Tensor:
    """The teacher's own scores for one history, with no service code in between."""
    kept = history[-service.max_history:]
    seq = UserSequences(indptr=np.array([0, len(kept)]), items=np.array(kept, dtype=np.int64),
                        n_items=service.n_items)
    return service.teacher.score(np.array([0]), seq)[0].float()


def _brute_topk(scores: torch.Tensor, eligible: set[int], k: int) -> list[int]:
    ordered = sorted(eligible, key=lambda item: (-float(scores[item]), item))[:k]
    return ordered + [-1] * (k - len(ordered))


def test_sasrec_topk_matches_brute_force(sasrec, synthetic):
    gen = np.random.default_rng(0)
    members = {c: set(v.tolist()) for c, v in synthetic.category_index().items()}
    names = sorted(members)
    everything = set(range(sasrec.n_items))
    histories, candidates, categories, expected = [], [], [], []
    for row in range(24):
        history = gen.choice(sasrec.n_items, size=int(gen.integers(0, 14)), replace=False).tolist()
        mode = row % 4
        cand = gen.choice(sasrec.n_items, size=8, replace=False).tolist() if mode == 0 else None
        category = None if mode in (0, 3) else ("+" if mode == 1 else "-") + names[row % len(names)]
        if mode == 0:
            eligible = set(cand) - set(history)
        elif mode == 1:
            eligible = members[category[1:]] - set(history)
        elif mode == 2:
            eligible = everything - members[category[1:]] - set(history)
        else:
            eligible = everything - set(history)
        histories.append(history)
        candidates.append(cand)
        categories.append(category)
        expected.append(_brute_topk(_brute_scores(sasrec, history), eligible, 10))
    top = sasrec.topk(histories, 10, candidates=candidates, categories=categories)
    assert top.tolist() == expected
    # the batch answer is the per-row answer
    rows = [sasrec.topk([h], 10, candidates=[c], categories=[g]).tolist()[0]
            for h, c, g in zip(histories, candidates, categories)]
    assert rows == expected


def test_sasrec_ranks_match_brute_force(sasrec):
    gen = np.random.default_rng(1)
    histories = [gen.choice(sasrec.n_items, size=6, replace=False).tolist() for _ in range(10)]
    candidates = [gen.choice(sasrec.n_items, size=5, replace=False).tolist() for _ in range(10)]
    ranks = sasrec.ranks(histories, candidates)
    for row, (history, cand) in enumerate(zip(histories, candidates)):
        scores = _brute_scores(sasrec, history)
        for col, item in enumerate(cand):
            above = int((scores > scores[item]).sum()) + int((scores[:item] == scores[item]).sum())
            assert int(ranks[row, col]) == above


def test_history_truncated_for_scoring_but_excluded_in_full(sasrec):
    history = list(range(15))
    full = sasrec.topk([history], 5, exclude_history=False)
    last = sasrec.topk([history[-10:]], 5, exclude_history=False)
    assert torch.equal(full, last)  # the teacher reads only the last max_history items
    excluded = sasrec.topk([history], 25)
    assert not set(excluded[0].tolist()) & set(history)  # every given item is excluded, not only the last ten


def test_user_based_teacher_needs_users(synthetic):
    teacher = BPRMF(epochs=1, dim=8, seed=0).fit(synthetic, synthetic.interactions, progress=False)
    service = TeacherService(teacher)
    with pytest.raises(RequestError, match="pass `users`"):
        service.topk([[1]], 3)
    top = service.topk([[1], [2]], 3, users=[5, 5])
    scores = teacher.user_embeddings_[5] @ teacher.item_embeddings_.T
    assert top[0].tolist() == _brute_topk(scores, set(range(service.n_items)) - {1}, 3)
    assert top[1].tolist() == _brute_topk(scores, set(range(service.n_items)) - {2}, 3)


@pytest.mark.parametrize("call, message", [
    (lambda s: s.topk([[0, 9]], 2), "unknown history item id.* 9"),
    (lambda s: s.topk([[-1]], 2), "unknown history item id.* -1"),
    (lambda s: s.topk([[2 ** 63]], 2), "unknown history item id.* 9223372036854775808"),  # beyond int64
    (lambda s: s.topk([[0]], 2, candidates=[[7]]), "unknown candidate item id.* 7"),
    (lambda s: s.topk([[0]], 2, categories=["+Horror"]), "unknown category 'Horror'"),
    (lambda s: s.topk([[0]], 2, categories=["Romance"]), "'\\+Name' or '-Name'"),
    (lambda s: s.topk([[0]], 0), "k must be a positive integer"),
    (lambda s: s.topk([[0], [1]], 2, categories=["+Romance"]), "categories has 1 rows but there are 2"),
    (lambda s: s.topk([[0]], 2, users=[3]), "unknown user id 3"),
    (lambda s: s.topk([["a"]], 2), "must be integers"),
    (lambda s: s.ranks([[0]], [[0, 5]]), "unknown candidate item id.* 5"),
])
def test_bad_requests_name_the_problem(popularity, call, message):
    with pytest.raises(RequestError, match=message):
        call(popularity)


def test_from_stage(tmp_path, sasrec):
    stage = tmp_path / "stages" / "sasrec"
    sasrec.teacher.save(stage / "model")
    loaded = TeacherService.from_stage(stage)
    histories = [[1, 2, 3], [4], []]
    assert torch.equal(loaded.topk(histories, 5), sasrec.topk(histories, 5))
    assert torch.equal(TeacherService.from_stage(stage / "model").ranks(histories, [[0, 1]] * 3),
                       sasrec.ranks(histories, [[0, 1]] * 3))
    with pytest.raises(RecalignError, match="not a teacher stage"):
        TeacherService.from_stage(tmp_path)


def test_row_chunks_give_the_same_answers(sasrec):
    chunked = TeacherService(sasrec.teacher, chunk_rows=3)
    gen = np.random.default_rng(5)
    histories = [gen.choice(sasrec.n_items, size=4, replace=False).tolist() for _ in range(10)]
    candidates = [gen.choice(sasrec.n_items, size=int(gen.integers(1, 6)), replace=False).tolist()
                  for _ in range(10)]
    categories = [None, "+" + sasrec.categories[0], "-" + sasrec.categories[1]] * 3 + [None]
    assert torch.equal(chunked.topk(histories, 6, categories=categories), sasrec.topk(histories, 6,
                                                                                    categories=categories))
    assert torch.equal(chunked.ranks(histories, candidates), sasrec.ranks(histories, candidates))
    assert sasrec.ranks(histories, candidates).shape == (10, max(len(c) for c in candidates))
