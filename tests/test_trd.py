"""TRD: the batched re-ranking environment, the DQN student, and the method on a synthetic temporal dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.data.dataset import build_dataset
from recalign.data.split import global_temporal_split
from recalign.errors import ConfigError
from recalign.methods.trd.algorithm import run_trd, sample_pools, teacher_lists, train_teacher
from recalign.methods.trd.config import DQNConfig, TRDConfig
from recalign.methods.trd.dqn import DQNReranker, RerankEnv, RerankEpisodes, hit_reward

PAD = 50  # n_items in the fake catalogs below; the padding item id


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: a second thread only adds synchronisation cost on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_episodes(n_users: int = 3, n_candidates: int = 30, relevant_every: int = 3, seed: int = 0,
                  labels: bool = True) -> RerankEpisodes:
    """Teacher lists = a random permutation of the 50-item catalog per user (first n_candidates)."""
    gen = torch.Generator().manual_seed(seed)
    candidates = torch.stack([torch.randperm(PAD, generator=gen)[:n_candidates] for _ in range(n_users)])
    relevant = (candidates % relevant_every == 0) if labels else None
    return RerankEpisodes(users=torch.arange(n_users), candidates=candidates, relevant=relevant,
                          teacher_scores=torch.linspace(2.0, -2.0, n_candidates).expand(n_users, -1).clone(),
                          start_states=torch.full((n_users, 5), PAD))


def random_reranker(dim: int = 8, n_users: int = 3, **config) -> DQNReranker:
    gen = torch.Generator().manual_seed(1)
    return DQNReranker(torch.randn(n_users, dim, generator=gen), torch.randn(PAD, dim, generator=gen), **config)


# ---- environment ----------------------------------------------------------------------------------

def test_reward_at_positions_one_to_three():
    episodes = fake_episodes(n_users=1, relevant_every=1)  # every candidate is a hit
    env = RerankEnv(episodes, n_actions=4, pad_item=PAD)
    rewards = [float(env.step(torch.tensor([0]))[1]) for _ in range(3)]
    assert rewards == pytest.approx([1.0, 1 / math.log2(3), 0.5])
    assert [hit_reward(t) for t in (1, 2, 3)] == pytest.approx([1.0, 0.6309298, 0.5])


def test_pred_score_adds_sigmoid_of_teacher_score_on_hits_only():
    episodes = fake_episodes(n_users=1, relevant_every=1)
    episodes.relevant[0, 1] = False
    env = RerankEnv(episodes, n_actions=4, pad_item=PAD, pred_score=True)
    first = float(env.step(torch.tensor([0]))[1])  # position 0 of the teacher list, score 2.0, a hit
    second = float(env.step(torch.tensor([0]))[1])  # position 1, a miss: no teacher-score bonus
    assert first == pytest.approx(1.0 + 1 / (1 + math.exp(-2.0)))
    assert second == 0.0


def test_state_moves_on_hit_and_stays_on_miss():
    candidates = torch.tensor([[10, 11, 12, 13]])
    episodes = RerankEpisodes(users=torch.tensor([0]), candidates=candidates,
                              relevant=torch.tensor([[True, False, True, False]]),
                              teacher_scores=torch.zeros(1, 4),
                              start_states=torch.tensor([[PAD, PAD, PAD, 1, 2]]))
    env = RerankEnv(episodes, n_actions=2, pad_item=PAD)
    env.step(torch.tensor([1]))  # window [10, 11]: picks 11, a miss
    assert env.state.tolist() == [[PAD, PAD, PAD, 1, 2]]
    env.step(torch.tensor([0]))  # window [10, 12]: picks 10, a hit -> FIFO push
    assert env.state.tolist() == [[PAD, PAD, 1, 2, 10]]
    env.step(torch.tensor([0]))  # window [12, 13]: picks 12, a hit
    assert env.state.tolist() == [[PAD, 1, 2, 10, 12]]


def test_window_keeps_teacher_order_and_refills():
    episodes = fake_episodes(n_users=1)
    teacher = episodes.candidates[0]
    env = RerankEnv(episodes, n_actions=3, pad_item=PAD)
    assert env.window_items()[0].tolist() == teacher[:3].tolist()
    env.step(torch.tensor([1]))
    assert env.window_items()[0].tolist() == [teacher[0], teacher[2], teacher[3]]


def test_sliding_window_never_offers_an_item_twice():
    episodes = fake_episodes(n_users=8, n_candidates=25, seed=3)
    env = RerankEnv(episodes, n_actions=5, pad_item=PAD)
    gen = torch.Generator().manual_seed(0)
    offered = [set() for _ in range(8)]
    picked = []
    for _ in range(30):  # past the end of the 25-item lists: empty slots appear
        windows = env.window_items()
        for u, row in enumerate(windows.tolist()):
            items = [i for i in row if i >= 0]
            assert len(items) == len(set(items))  # no duplicate inside a window
            assert not (set(items) & {p for p in picked_items(picked, u)})  # nothing picked comes back
            offered[u] |= set(items)
        slots = torch.randint(5, (8,), generator=gen)
        picked.append(env.step(slots)[0])
    lists = torch.stack(picked, dim=1)
    for u in range(8):
        items = [i for i in lists[u].tolist() if i >= 0]
        assert len(items) == len(set(items))
        assert set(items) <= set(episodes.candidates[u].tolist())
        assert offered[u] == set(episodes.candidates[u].tolist())


def picked_items(picked: list[torch.Tensor], user: int) -> list[int]:
    return [int(p[user]) for p in picked if int(p[user]) >= 0]


# ---- the student ----------------------------------------------------------------------------------

def test_one_action_reproduces_the_teacher_list_exactly():
    episodes = fake_episodes(n_users=4, n_candidates=30)
    student = random_reranker(n_users=4, n_actions=1, epochs=1, train_steps=10, learning_starts=8,
                              batch_size=8, users_per_batch=2, hidden_sizes=[16])
    student.fit(episodes)
    lists = student.rerank(RerankEpisodes(episodes.users, episodes.candidates, None, episodes.teacher_scores,
                                          episodes.start_states), length=30)
    assert torch.equal(lists, episodes.candidates)


def test_rerank_is_deterministic_and_pads_exhausted_lists():
    episodes = fake_episodes(n_users=3, n_candidates=6, labels=False)
    student = random_reranker(n_actions=4, dropout=0.5)
    first, second = student.rerank(episodes, length=8), student.rerank(episodes, length=8)
    assert torch.equal(first, second)
    assert (first[:, 6:] == -1).all()
    for u in range(3):
        assert sorted(first[u, :6].tolist()) == sorted(episodes.candidates[u].tolist())


def test_student_learns_to_pull_relevant_items_up():
    # Relevant items (id % 3 == 0) carry a +1 marker in their embedding; the teacher list ignores it.
    # A student with a 10-item window can move them up, which the teacher cannot.
    n_users, dim = 16, 8
    gen = torch.Generator().manual_seed(0)
    items = torch.randn(PAD, dim, generator=gen) * 0.1
    items[:, 0] = torch.where(torch.arange(PAD) % 3 == 0, 1.0, -1.0)
    users = torch.randn(n_users, dim, generator=gen) * 0.1
    train = fake_episodes(n_users=n_users, n_candidates=40, seed=1)
    test = fake_episodes(n_users=n_users, n_candidates=40, seed=2, labels=False)
    student = DQNReranker(users, items, DQNConfig(n_actions=10, epochs=3, train_steps=20, users_per_batch=8,
                                                  batch_size=64, learning_starts=64, lr=0.003, seed=0,
                                                  hidden_sizes=[32, 16]))
    student.fit(train)
    lists = student.rerank(test, length=10)
    precision = lambda lists: float((lists % 3 == 0).float().mean())  # noqa: E731
    assert precision(lists) > precision(test.candidates[:, :10]) + 0.15
    assert student.history_[-1]["mean_return"] > student.history_[0]["mean_return"]


def test_validation_callback_selects_the_best_epoch():
    episodes = fake_episodes(n_users=4)
    scores = iter([0.1, 0.5, 0.2])
    student = random_reranker(n_users=4, epochs=3, train_steps=5, learning_starts=4, batch_size=4)
    snapshots = []

    def validate(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    student.fit(episodes, validate=validate)
    assert student.best_epoch_ == 2
    assert [r["validation"] for r in student.history_] == [0.1, 0.5, 0.2]
    for key, value in student.state_dict().items():
        assert torch.equal(value, snapshots[1][key])


def test_bad_setting_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="n_actions"):
        random_reranker(n_actions=0)
    with pytest.raises(ConfigError, match="gama"):
        random_reranker(gama=0.5)


# ---- the method on a synthetic temporal dataset ---------------------------------------------------------

@pytest.fixture(scope="module")
def temporal():
    """40 users x 60 items; each user has a taste cluster of 20 items and 24 time-interleaved interactions."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(40):
        cluster = (user % 3) * 20
        items = rng.choice(np.arange(cluster, cluster + 20), size=16, replace=False).tolist()
        items += rng.choice(np.setdiff1d(np.arange(60), items), size=8, replace=False).tolist()
        for step, item in enumerate(items):
            rows.append({"user": f"u{user}", "item": f"i{item}", "timestamp": step * 100 + user})
    dataset = build_dataset(pd.DataFrame(rows), name="synthetic-temporal", source="test")
    split = global_temporal_split(dataset)
    teacher = train_teacher("bprmf", dataset, split, {"dim": 8, "epochs": 5}, seed=0)
    return dataset, split, teacher


def test_pools_hold_every_positive_no_seen_item_and_are_seeded():
    positives = torch.zeros(3, 30, dtype=torch.bool)
    positives[0, [1, 2]] = True
    positives[1, 5] = True
    positives[2, list(range(12))] = True  # more positives than cand_num
    seen = torch.zeros(3, 30, dtype=torch.bool)
    seen[:, 20:] = True
    pools = sample_pools(positives, seen, cand_num=10, generator=torch.Generator().manual_seed(0))
    again = sample_pools(positives, seen, cand_num=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pools, again)
    assert pools.shape == (3, 12)
    for row in range(3):
        items = [i for i in pools[row].tolist() if i >= 0]
        assert len(items) == len(set(items)) == (10 if row < 2 else 12)
        assert set(torch.nonzero(positives[row]).flatten().tolist()) <= set(items)
        assert not set(items) & set(range(20, 30))
    small = sample_pools(positives, seen, cand_num=100, generator=torch.Generator().manual_seed(0))
    assert small.shape == (3, 30)  # a catalog smaller than cand_num: every unseen item, nothing twice
    assert [int((row >= 0).sum()) for row in small] == [20, 20, 20]


def test_teacher_lists_follow_teacher_scores_and_start_from_history(temporal):
    dataset, split, teacher = temporal
    lists = teacher_lists(teacher, dataset, split, "test", cand_num=30, state_len=5, seed=0)
    episodes = lists.episodes
    scores = episodes.teacher_scores
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    history = dataset.sequences(split.history("test"))
    for row, user in enumerate(episodes.users.tolist()):
        relevant = lists.relevant[row]
        assert relevant == set(split.test.loc[split.test["user_id"] == user, "item_id"].tolist())
        flagged = {int(i) for i, r in zip(episodes.candidates[row], episodes.relevant[row]) if r}
        assert flagged == relevant
        past = history[user][-5:].tolist()
        assert episodes.start_states[row].tolist() == [dataset.n_items] * (5 - len(past)) + past
        assert not set(episodes.candidates[row].tolist()) & set(history[user].tolist())


def test_trd_with_one_action_equals_the_teacher(temporal):
    dataset, split, teacher = temporal
    config = TRDConfig(cand_num=40, ks=[1, 5, 10],
                       dqn=DQNConfig(n_actions=1, epochs=1, train_steps=5, learning_starts=8, batch_size=8))
    result = run_trd(dataset, split, teacher, config, seed=0)
    assert torch.equal(result.student_test_lists, result.teacher_test_lists)
    assert result.student_test == result.teacher_test
    assert result.counts["n_users"] == split.test["user_id"].nunique()


def test_trd_stage_runs_in_a_recipe(temporal, tmp_path):
    from recalign.config import Recipe
    from recalign.runs import run_recipe

    dataset, _, _ = temporal
    dataset.save(tmp_path / "data")
    recipe = Recipe.model_validate({
        "name": "trd-test", "seed": 0, "data": {"path": str(tmp_path / "data")},
        "split": {"kind": "global_temporal"}, "eval": {"ks": [1, 10]},
        "stages": [{"name": "bprmf", "kind": "teacher", "params": {"model": "bprmf", "params": {"dim": 8,
                                                                                                 "epochs": 3}}},
                   {"name": "trd", "kind": "trd", "params": {
                       "teacher": "bprmf", "cand_num": 40, "protocol": "trd_temporal",
                       "dqn": {"epochs": 2, "train_steps": 5, "learning_starts": 8, "batch_size": 8}}}]})
    summary = run_recipe(recipe, tmp_path / "run", progress=False)
    metrics = summary["stages"]["trd"]
    assert metrics["model"] == "trd(bprmf)" and metrics["protocol"] == "trd_temporal"
    assert {"ndcg@10", "hr@1", "teacher.ndcg@10", "valid.ndcg@10", "best_epoch"} <= set(metrics)
    assert metrics["best_epoch"] in (1, 2)
    assert (tmp_path / "run" / "stages" / "trd" / "student.pt").is_file()
    for stage, epochs in (("trd", 2), ("bprmf", 3)):  # the DQN student's and the teacher's training curves
        folder = tmp_path / "run" / "stages" / stage
        rows = [json.loads(line) for line in (folder / "curves.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
        assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rows[0]["valid_metric"] == "recall@10" and json.loads(
        (tmp_path / "run" / "stages" / "trd" / "curves.jsonl").read_text().splitlines()[0])["valid_metric"] == "ndcg@10"


def test_trd_needs_the_global_temporal_split(temporal):
    from recalign.data.split import leave_one_out_split

    dataset, _, teacher = temporal
    with pytest.raises(ConfigError, match="global_temporal"):
        run_trd(dataset, leave_one_out_split(dataset), teacher, TRDConfig(cand_num=40))


def test_trd_stage_under_a_non_temporal_recipe_split(temporal, tmp_path):
    from recalign.config import Recipe
    from recalign.runs import run_recipe

    dataset, _, _ = temporal
    dataset.save(tmp_path / "data")
    base = {"name": "trd-loo", "seed": 0, "data": {"path": str(tmp_path / "data")},
            "split": {"kind": "leave_one_out"}, "eval": {"ks": [1, 10]}}
    tiny = {"cand_num": 40, "protocol": "trd_temporal", "teacher_params": {"dim": 8, "epochs": 2},
            "dqn": {"epochs": 1, "train_steps": 4, "learning_starts": 8, "batch_size": 8}}
    own = Recipe.model_validate({**base, "stages": [{"name": "trd", "kind": "trd",
                                                     "params": {"teacher": "bprmf", **tiny}}]})
    metrics = run_recipe(own, tmp_path / "own", progress=False)["stages"]["trd"]
    assert metrics["split"].startswith("own global_temporal")
    leaky = Recipe.model_validate({**base, "stages": [
        {"name": "mf", "kind": "teacher", "params": {"model": "bprmf", "params": {"dim": 8, "epochs": 2}}},
        {"name": "trd", "kind": "trd", "params": {"teacher": "mf", **tiny}}]})
    with pytest.raises(ConfigError, match="overlaps"):
        run_recipe(leaky, tmp_path / "leaky", progress=False)
    # A stage and a model share the name "bprmf": teacher_source picks the model, trained on TRD's own train1.
    both = Recipe.model_validate({**base, "stages": [
        {"name": "bprmf", "kind": "teacher", "params": {"model": "bprmf", "params": {"dim": 8, "epochs": 2}}},
        {"name": "trd", "kind": "trd", "params": {"teacher": "bprmf", "teacher_source": "model", **tiny}}]})
    metrics = run_recipe(both, tmp_path / "both", progress=False)["stages"]["trd"]
    assert metrics["split"].startswith("own global_temporal") and metrics["teacher_train_seconds"] > 0


# ---- determinism whatever the thread count -------------------------------------------------------------

@pytest.fixture(scope="module")
def larger_temporal():
    """300 users x 200 items x 30 interactions: batches big enough (2048 x 32 values) for torch to split the
    embedding-gradient accumulation over threads, which is where two threads used to change the results."""
    rng = np.random.default_rng(1)
    rows = []
    for user in range(300):
        cluster = (user % 5) * 40
        items = rng.choice(np.arange(cluster, cluster + 40), size=24, replace=False).tolist()
        items += rng.choice(np.setdiff1d(np.arange(200), items), size=6, replace=False).tolist()
        rows += [{"user": f"u{user}", "item": f"i{item}", "timestamp": step * 1000 + user}
                 for step, item in enumerate(items)]
    dataset = build_dataset(pd.DataFrame(rows), name="synthetic-temporal-300", source="test")
    return dataset, global_temporal_split(dataset)


def _trd_with_threads(dataset, split, threads: int) -> tuple[dict, dict, torch.Tensor]:
    """Teacher + TRD run entirely under `threads` torch threads: (teacher test, student test, teacher items)."""
    teacher = train_teacher("bprmf", dataset, split, {"dim": 32, "batch_size": 2048, "epochs": 6, "lr": 0.01,
                                                       "threads": threads}, seed=0)
    config = TRDConfig(cand_num=80, ks=[1, 5, 10], threads=threads,
                       dqn=DQNConfig(epochs=2, train_steps=8, learning_starts=32, batch_size=64))
    result = run_trd(dataset, split, teacher, config, seed=0)
    return result.teacher_test, result.student_test, teacher.item_embeddings_


def test_trd_metrics_are_identical_with_one_and_two_threads(larger_temporal):
    dataset, split = larger_temporal
    first = _trd_with_threads(dataset, split, 2)
    second = _trd_with_threads(dataset, split, 2)
    single = _trd_with_threads(dataset, split, 1)
    assert torch.equal(first[2], second[2]) and torch.equal(first[2], single[2])  # bit-identical teacher
    assert first[:2] == second[:2] == single[:2]
    assert torch.get_num_threads() == 1  # the fixture's setting is restored after each run
