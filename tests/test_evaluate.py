"""evaluate(): full and sampled protocols end to end on a fixed-score recommender (hand-computed)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.data.dataset import build_dataset
from recalign.data.sampling import load_candidates
from recalign.data.split import global_temporal_split, leave_one_out_split
from recalign.errors import ConfigError
from recalign.eval.evaluate import evaluate
from recalign.teachers.base import Recommender

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

L2 = 1 / math.log2(3)

# rows: user, item, timestamp (original ids equal dense ids: users and items appear in order 0, 1, ...)
ROWS = [("0", "0", 1), ("0", "1", 2), ("0", "2", 3), ("0", "3", 4),
        ("1", "4", 1), ("1", "0", 2), ("1", "1", 3),
        ("2", "2", 1), ("2", "3", 2)]
ITEMS = pd.DataFrame({"item": ["0", "1", "2", "3", "4"]})
SCORES = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.5],
                       [0.2, 0.2, 0.9, 0.2, 0.3],
                       [0.0, 0.0, 0.0, 0.0, 0.0]])


class FixedScores(Recommender):
    """A recommender whose scores are a fixed table (one row per user)."""

    name = "fixed"

    def fit(self, dataset, train, valid=None, progress=True):
        self._remember_catalog(dataset)
        return self

    def score(self, users, history):
        return SCORES[torch.as_tensor(np.asarray(users))]


@pytest.fixture()
def setup():
    frame = pd.DataFrame(ROWS, columns=["user", "item", "timestamp"])
    dataset = build_dataset(frame, items=ITEMS, name="t", source="test")
    split = leave_one_out_split(dataset)
    return FixedScores().fit(dataset, split.train), dataset, split


def test_full_protocol_with_history_exclusion(setup):
    model, dataset, split = setup
    out = evaluate(model, dataset, split, ks=(1, 2), progress=False)
    # test history: u0 {0,1,2} -> ranks 4 (0.5), 3 (0.1): target 3 at rank 2
    #               u1 {4,0}   -> 2 (0.9), then 1 and 3 tie at 0.2 -> id 1 first: target 1 at rank 2
    # u2 has 2 interactions -> no test row -> removed
    assert out["hr@1"] == 0 and out["hr@2"] == 1
    assert out["ndcg@2"] == pytest.approx(L2) and out["mrr@2"] == pytest.approx(0.5)
    assert out["precision@2"] == pytest.approx(0.5)
    assert (out["n_users"], out["n_removed"], out["protocol"], out["exclude_history"]) == (2, 1, "full", True)
    assert out["k"] == [1, 2] and out["part"] == "test"
    # lists [4, 3] and [2, 1] cover 4 of 5 items; every item has 1 training interaction -> AvgPop 1
    assert out["coverage@2"] == pytest.approx(4 / 5) and out["avg_pop@2"] == pytest.approx(1.0)


def test_full_protocol_without_history_exclusion(setup):
    model, dataset, split = setup
    out = evaluate(model, dataset, split, ks=(5,), exclude_history=False, progress=False)
    # u0: 0, 1, 2, 4, 3 -> rank 5; u1: 2, 4, then 0, 1, 3 tied -> target 1 at rank 4
    assert out["ndcg@5"] == pytest.approx((1 / math.log2(6) + 1 / math.log2(5)) / 2)
    assert out["mrr@5"] == pytest.approx((1 / 5 + 1 / 4) / 2)
    assert out["exclude_history"] is False


def test_valid_part_uses_train_as_history(setup):
    model, dataset, split = setup
    out = evaluate(model, dataset, split, part="valid", ks=(1,), progress=False)
    # u0 history {0,1}: 2 (0.7) first = target; u1 history {4}: 2 (0.9), 0 (0.2, beats 1 and 3) -> rank 2
    assert out["hr@1"] == pytest.approx(0.5)


def test_sampled_protocol_ranks_target_among_saved_candidates(setup, tmp_path):
    model, dataset, split = setup
    path = tmp_path / "candidates.pt"
    out = evaluate(model, dataset, split, ks=(1,), protocol="sampled", n_negatives=1, seed=5,
                   candidates_path=path, progress=False)
    users, cands, seed = load_candidates(path)
    assert users.tolist() == [0, 1] and seed == 5 and cands[:, 0].tolist() == [3, 1]
    # u0 never touched only item 4 -> candidates [3, 4]: 4 (0.5) beats 3 (0.1) -> miss at K=1
    assert cands[0, 1] == 4
    # u1 never touched 2 and 3: against 2 (0.9) the target loses; against 3 (tie 0.2) id 1 < 3 wins
    u1_hit = 1.0 if int(cands[1, 1]) == 3 else 0.0
    assert int(cands[1, 1]) in (2, 3)
    assert out["hr@1"] == pytest.approx(u1_hit / 2)
    assert out["protocol"] == "sampled" and out["candidate_seed"] == 5 and out["n_negatives"] == 1
    again = evaluate(model, dataset, split, ks=(1,), protocol="sampled", n_negatives=1, seed=5,
                     candidates_path=path, progress=False)
    assert again["hr@1"] == out["hr@1"]


def test_multi_target_temporal_part_and_bad_protocol(setup):
    model, dataset, _ = setup
    split = global_temporal_split(dataset, fractions=(0.5, 0.0, 0.0, 0.5))
    # time order (stable): t=1: (0,0), (1,4), (2,2); t=2: (0,1), (1,0), (2,3); t=3, 3, 4: the rest.
    # Nominal cut round(4.5) = 4 lands inside the t=2 group -> all t=2 rows go to train (6 rows).
    assert len(split.train) == 6 and len(split.test) == 3
    out = evaluate(model, dataset, split, ks=(3,), progress=False)
    # test: u0 {2, 3}, u1 {1}; u0 history {0,1} -> 2, 4, 3: hits at 1 and 3; u1 history {4,0} -> 2, 1, 3: hit at 2
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["ndcg@3"] == pytest.approx(((1 + 0.5) / (1 + L2) + L2) / 2)
    assert out["n_users"] == 2
    with pytest.raises(ConfigError):
        evaluate(model, dataset, split, protocol="bogus", progress=False)


class DotModel(Recommender):
    """Scores = user . item embeddings; `expose` decides whether evaluate may see the embeddings."""

    name = "dot"

    def __init__(self, users, items, expose=True, shift=0.0):
        super().__init__()
        self.users, self.items, self.shift = users, items, shift
        if expose:
            self.user_embeddings_, self.item_embeddings_ = users, items

    def fit(self, dataset, train, valid=None, progress=True):
        self._remember_catalog(dataset)
        return self

    def score(self, users, history):
        return self.users[torch.as_tensor(np.asarray(users))] @ self.items.T + self.shift


def test_factor_fast_path_gives_the_generic_result():
    rng = np.random.default_rng(0)
    rows = [(str(u), str(i), t) for u in range(30) for t, i in enumerate(rng.choice(200, 12, replace=False))]
    items = pd.DataFrame({"item": [str(i) for i in range(200)]})
    dataset = build_dataset(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), items=items,
                            name="t", source="test")
    split = leave_one_out_split(dataset)
    gen = torch.Generator().manual_seed(0)
    users, item_emb = torch.randn(30, 8, generator=gen), torch.randn(200, 8, generator=gen)
    for exclude in (True, False):
        fast = evaluate(DotModel(users, item_emb).fit(dataset, split.train), dataset, split, ks=(5, 10),
                        exclude_history=exclude, progress=False)
        slow = evaluate(DotModel(users, item_emb, expose=False).fit(dataset, split.train), dataset, split,
                        ks=(5, 10), exclude_history=exclude, progress=False)
        assert fast == slow
    # embeddings whose dot product is not the score (a per-item shift changes the order) are not used
    from recalign.eval.evaluate import factor_embeddings

    shifted = DotModel(users, item_emb, shift=1.0).fit(dataset, split.train)
    assert factor_embeddings(shifted, dataset.sequences(split.train)) is None
    assert factor_embeddings(DotModel(users, item_emb), dataset.sequences(split.train)) is not None
