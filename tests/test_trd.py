"""TRD: the batched re-ranking environment, the DQN student, and the method on a synthetic temporal dataset."""

from __future__ import annotations

import math

import pytest
import torch

from recalign.errors import ConfigError
from recalign.rl.dqn import DQNConfig, DQNReranker, RerankEnv, RerankEpisodes, hit_reward

PAD = 50  # n_items in the fake catalogs below; the padding item id


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
                              batch_size=8, users_per_batch=2)
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
    student = DQNReranker(users, items, DQNConfig(n_actions=10, epochs=4, train_steps=20, users_per_batch=8,
                                                  batch_size=64, learning_starts=64, lr=0.003, seed=0))
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
