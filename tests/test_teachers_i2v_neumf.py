"""Item2Vec and NeuMF on small synthetic data with planted structure: hand-checked scores, planted neighbours, wins
over Popularity, save/load, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from recalign.data.dataset import Dataset, build_dataset
from recalign.errors import ConfigError
from recalign.teachers.item2vec import Item2Vec, UnigramSampler, skipgram_pairs
from recalign.teachers.neumf import NeuMF, NeuMFNetwork
from recalign.teachers.popularity import Popularity
from recalign.teachers.registry import get_teacher, load_teacher_dir

pytestmark = pytest.mark.fast

SMALL_I2V = {"dim": 16, "window": 3, "epochs": 10, "batch_size": 1024, "lr": 1e-2}
SMALL_NEUMF = {"gmf_dim": 8, "mlp_layers": [16, 8], "epochs": 10, "batch_size": 256, "lr": 1e-2}


# ---- synthetic data (as tests/test_teachers.py) ----------------------------------------------------------------

def _dataset(sequences: list[list[int]], n_items: int) -> Dataset:
    """Dataset from per-user item sequences (dense ids 0..n_items-1 kept as original ids in order)."""
    rows = [(f"u{u}", str(i), t) for u, seq in enumerate(sequences) for t, i in enumerate(seq)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"item": [str(i) for i in range(n_items)], "categories": [[] for _ in range(n_items)]})
    return build_dataset(frame, items=items, name="synthetic", source="test")


def _latent_factor_data(seed: int = 0, n_users: int = 300, n_items: int = 120, groups: int = 6, length: int = 20):
    """Users of a taste group draw 90% of their items from that group's items (plus a mild global popularity)."""
    rng = np.random.default_rng(seed)
    item_group = rng.integers(groups, size=n_items)
    popularity = rng.pareto(2.0, size=n_items) + 1.0
    sequences = []
    for u in range(n_users):
        weights = popularity * np.where(item_group == u % groups, 9.0 * groups, 1.0)
        sequences.append(list(rng.choice(n_items, size=length, replace=False, p=weights / weights.sum())))
    return _dataset(sequences, n_items)


def _leave_one_out(dataset: Dataset) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Last interaction of each user = test, second to last = valid, the rest = train."""
    frame = dataset.interactions.sort_values(["user_id", "timestamp"], kind="stable")
    rank_from_end = frame.groupby("user_id").cumcount(ascending=False)
    return frame[rank_from_end >= 2], frame[rank_from_end == 1], frame[rank_from_end == 0]


def _test_hit_rate(model, dataset: Dataset, train, valid, test, k: int = 10) -> float:
    """HR@k of the test item with history = train + valid excluded (full ranking)."""
    history = dataset.sequences(pd.concat([train, valid]))
    items, _ = model.recommend(test["user_id"].to_numpy(), history, k)
    targets = torch.from_numpy(test["item_id"].to_numpy(dtype=np.int64, copy=True))
    return float((items == targets.unsqueeze(1)).any(1).float().mean())


@pytest.fixture(scope="module")
def latent():
    data = _latent_factor_data()
    return (data, *_leave_one_out(data))


def _planted_groups_data(seed: int = 0, n_users: int = 200, groups: int = 6, size: int = 4, singles: int = 16,
                         noise: int = 3):
    """Items g*size .. g*size+size-1 form group g and always appear together: user u's sequence is all of group
    u % groups plus `noise` random items of a shared pool of singles, in random order.

    (A bare pair a, b that always co-occurs would not do: SGNS aligns a's input vector with b's context vector, and
    with nothing else in common the input vectors of a and b stay unrelated. Group mates share contexts.)"""
    rng = np.random.default_rng(seed)
    sequences = []
    for u in range(n_users):
        g = u % groups
        items = list(range(g * size, (g + 1) * size)) + [groups * size + int(s) for s in
                                                           rng.choice(singles, size=noise, replace=False)]
        sequences.append([int(i) for i in rng.permutation(items)])
    return _dataset(sequences, groups * size + singles)


# ---- Item2Vec --------------------------------------------------------------------------------------------------

def test_skipgram_pairs_stay_inside_one_users_window():
    data = _dataset([[0, 1, 2], [3, 4], [5]], n_items=6)
    centers, contexts = skipgram_pairs(data.sequences(), window=1)
    assert sorted(zip(centers.tolist(), contexts.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (3, 4), (4, 3)]
    centers, contexts = skipgram_pairs(data.sequences(), window=5)
    assert sorted(zip(centers.tolist(), contexts.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1),
                                                                (3, 4), (4, 3)]


def test_unigram_sampler_follows_counts_to_the_three_quarters():
    counts = torch.tensor([16.0, 0.0, 1.0, 81.0])
    drawn = UnigramSampler(counts, 0.75).sample((200000,), torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=4).double() / len(drawn)
    expected = torch.tensor([8.0, 0.0, 1.0, 27.0], dtype=torch.float64) / 36.0  # 16^.75, 1, 81^.75
    assert freq[1] == 0 and torch.allclose(freq, expected, atol=5e-3), freq


def test_item2vec_loss_falls_and_planted_groups_are_nearest_neighbours():
    data = _planted_groups_data()
    model = Item2Vec(dim=16, window=3, epochs=15, batch_size=512, lr=1e-2).fit(data, data.interactions,
                                                                              progress=False)
    assert model.loss_history_[-1] < 0.8 * model.loss_history_[0], model.loss_history_
    assert all(b < a for a, b in zip(model.loss_history_, model.loss_history_[1:5])), model.loss_history_
    emb = torch.nn.functional.normalize(model.item_embeddings_, dim=1)
    similarity = emb @ emb.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.topk(3, dim=1).indices[:24].sort(1).values  # each grouped item's 3 nearest neighbours
    mates = [[j for j in range(g // 4 * 4, g // 4 * 4 + 4) if j != g] for g in range(24)]
    assert nearest.tolist() == mates
    # scoring: cosine with the mean of the unit history vectors; `dot` uses the raw mean
    history = data.sequences()
    expected = torch.nn.functional.normalize(emb[torch.from_numpy(history[3])].mean(0), dim=0) @ emb.T
    torch.testing.assert_close(model.score([3], history)[0], expected)
    dot = Item2Vec(**{**model.config.model_dump(), "similarity": "dot"})
    dot.__dict__.update({k: v for k, v in model.__dict__.items() if k != "config"})
    raw = model.item_embeddings_
    torch.testing.assert_close(dot.score([3], history)[0], raw[torch.from_numpy(history[3])].mean(0) @ raw.T)
    recent = Item2Vec(**{**model.config.model_dump(), "max_history": 2})
    recent.__dict__.update({k: v for k, v in model.__dict__.items() if k != "config"})
    last_two = torch.nn.functional.normalize(emb[torch.from_numpy(history[3][-2:])].mean(0), dim=0) @ emb.T
    torch.testing.assert_close(recent.score([3], history)[0], last_two)


def test_item2vec_beats_popularity_on_latent_factor_data(latent):
    data, train, valid, test = latent
    model = Item2Vec(**SMALL_I2V).fit(data, train, valid, progress=False)
    hr = _test_hit_rate(model, data, train, valid, test)
    hr_pop = _test_hit_rate(Popularity().fit(data, train), data, train, valid, test)
    assert hr > hr_pop + 0.2, (hr, hr_pop)
    assert model.valid_history_ and len(model.curve_) == model.epochs_trained_


# ---- NeuMF -----------------------------------------------------------------------------------------------------

def test_neumf_score_is_the_output_layer_over_gmf_and_mlp_by_hand(tiny_dataset):
    model = NeuMF(gmf_dim=2, mlp_layers=[4, 3], epochs=1).fit(tiny_dataset, tiny_dataset.interactions, progress=False)
    net = model.network_
    p_g, q_g = torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 1.0]]), torch.arange(10.0).reshape(5, 2) / 10
    p_m, q_m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0]]), torch.arange(10.0).reshape(5, 2) / 5 - 1
    w0 = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, -1.0, 1.0, -1.0]])
    b0, h, b = torch.tensor([0.0, -0.5, 0.2]), torch.tensor([[0.3, -1.0, 2.0, 0.5, -0.25]]), torch.tensor([0.1])
    with torch.no_grad():
        for param, value in [(net.user_gmf, p_g), (net.item_gmf, q_g), (net.user_mlp, p_m), (net.item_mlp, q_m),
                             (net.tower[0].weight, w0), (net.tower[0].bias, b0), (net.output.weight, h),
                             (net.output.bias, b)]:
            param.copy_(value)
    scores = model.score(np.arange(3), tiny_dataset.sequences())
    for u in range(3):
        for i in range(5):
            gmf = [p_g[u, k].item() * q_g[i, k].item() for k in range(2)]
            x = [p_m[u, 0].item(), p_m[u, 1].item(), q_m[i, 0].item(), q_m[i, 1].item()]
            mlp = [max(0.0, sum(w0[r, c].item() * x[c] for c in range(4)) + b0[r].item()) for r in range(3)]
            logit = sum(hk * vk for hk, vk in zip(h[0].tolist(), gmf + mlp)) + b.item()
            assert scores[u, i].item() == pytest.approx(logit, abs=1e-5), (u, i)


def test_neumf_scoring_shortcut_equals_the_forward_pass(latent):
    data, train, _, _ = latent
    model = NeuMF(**{**SMALL_NEUMF, "mlp_layers": [16, 12, 8, 4], "epochs": 2}).fit(data, train, progress=False)
    users = torch.arange(7)
    pairs_u, pairs_i = users.repeat_interleave(data.n_items), torch.arange(data.n_items).repeat(len(users))
    with torch.no_grad():
        forward = model.network_(pairs_u, pairs_i).reshape(len(users), data.n_items)
    torch.testing.assert_close(model.score(users.numpy(), data.sequences(train)), forward, rtol=1e-5, atol=1e-5)


def test_neumf_users_without_training_interactions_get_zero_embeddings(latent):
    data, train, _, _ = latent
    model = NeuMF(**{**SMALL_NEUMF, "epochs": 2}).fit(data, train[train["user_id"] != 5], progress=False)
    net = model.network_
    assert not net.user_gmf[5].any() and not net.user_mlp[5].any() and net.user_gmf[4].any()
    scores = model.score([5, 5], data.sequences(train))
    with torch.no_grad():
        item_only = net(torch.full((data.n_items,), 5), torch.arange(data.n_items))
    torch.testing.assert_close(scores[0], item_only, rtol=1e-5, atol=1e-5)


def test_neumf_pretraining_initialises_the_output_layer_from_both_branches(latent):
    torch.manual_seed(0)
    gmf = NeuMFNetwork(4, 6, 3, [4, 2], parts=("gmf",))
    mlp = NeuMFNetwork(4, 6, 3, [4, 2], parts=("mlp",))
    fused = NeuMFNetwork(4, 6, 3, [4, 2])
    fused.load_pretrained(gmf, mlp, alpha=0.25)
    torch.testing.assert_close(fused.output.weight, torch.cat([0.25 * gmf.output.weight, 0.75 * mlp.output.weight],
                                                              1))
    torch.testing.assert_close(fused.output.bias, 0.25 * gmf.output.bias + 0.75 * mlp.output.bias)
    users, items = torch.tensor([0, 1, 3]), torch.tensor([5, 2, 0])
    torch.testing.assert_close(fused(users, items), 0.25 * gmf(users, items) + 0.75 * mlp(users, items))
    data, train, valid, _ = latent
    model = NeuMF(**{**SMALL_NEUMF, "epochs": 2, "pretrain": True, "pretrain_epochs": 2}).fit(data, train, valid,
                                                                                            progress=False)
    assert sorted(model.pretrain_history_) == ["gmf", "mlp"] and len(model.pretrain_history_["gmf"]) == 2
    assert model.epochs_trained_ == 2


def test_neumf_beats_popularity_on_latent_factor_data(latent):
    data, train, valid, test = latent
    model = NeuMF(**SMALL_NEUMF).fit(data, train, valid, progress=False)
    assert model.loss_history_[-1] < 0.6 * model.loss_history_[0], model.loss_history_
    hr = _test_hit_rate(model, data, train, valid, test)
    hr_pop = _test_hit_rate(Popularity().fit(data, train), data, train, valid, test)
    assert hr > hr_pop + 0.2, (hr, hr_pop)


def test_neumf_early_stopping_keeps_best_valid_epoch(latent):
    data, train, valid, _ = latent
    model = NeuMF(**{**SMALL_NEUMF, "epochs": 60, "patience": 2, "lr": 5e-2}).fit(data, train, valid,
                                                                                  progress=False)
    epochs, recalls = zip(*model.valid_history_)
    assert model.epochs_trained_ < 60
    assert model.best_epoch_ == epochs[int(np.argmax(recalls))]
    assert model.epochs_trained_ - model.best_epoch_ == 2


# ---- both: persistence, determinism, registry, CLI -------------------------------------------------------------

@pytest.mark.parametrize("name", ["item2vec", "neumf"])
def test_save_load_gives_identical_scores_and_same_seed_is_deterministic(latent, tmp_path, name):
    data, train, valid, _ = latent
    overrides = {"item2vec": {**SMALL_I2V, "epochs": 2}, "neumf": {**SMALL_NEUMF, "epochs": 2}}[name]
    cls = get_teacher(name)
    first = cls(seed=7, **overrides).fit(data, train, valid, progress=False)
    history, users = data.sequences(train), np.arange(data.n_users)
    scores = first.score(users, history)
    first.save(tmp_path / "model")
    loaded = load_teacher_dir(tmp_path / "model")
    assert type(loaded) is cls and loaded.config == first.config
    torch.testing.assert_close(loaded.score(users, history), scores, rtol=0, atol=0)
    again = cls(seed=7, **overrides).fit(data, train, valid, progress=False)
    torch.testing.assert_close(again.score(users, history), scores, rtol=0, atol=0)
    other = cls(seed=8, **overrides).fit(data, train, valid, progress=False)
    assert not torch.equal(other.score(users, history), scores)


def test_registry_lazy_names_and_config_errors():
    import recalign

    assert get_teacher("item2vec") is Item2Vec is recalign.Item2Vec
    assert get_teacher("neumf") is NeuMF is recalign.NeuMF
    with pytest.raises(ConfigError, match="mlp_layers"):
        NeuMF(mlp_layers=[5, 2])
    with pytest.raises(ConfigError, match="alpha"):
        NeuMF(alpha=1.5)
    with pytest.raises(ConfigError, match="similarity"):
        Item2Vec(similarity="euclidean")
    with pytest.raises(ConfigError, match="window"):
        Item2Vec(window=0)


@pytest.mark.parametrize("name,settings", [("neumf", ["epochs=2", "pretrain=true", "pretrain_epochs=1",
                                                      "mlp_layers=[8,4]"]),
                                           ("item2vec", ["epochs=2", "dim=8"])])
def test_teacher_train_from_the_cli(tmp_path, name, settings):
    from recalign.cli import app

    rng = np.random.default_rng(1)
    frame = pd.DataFrame([(f"u{u}", f"i{int(rng.integers(15))}", t) for u in range(10) for t in range(6)],
                         columns=["user", "item", "timestamp"])
    prepared = build_dataset(frame, name="tiny", source="test").save(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["teacher", "train", name, "--data", str(prepared), "--out", str(run_dir),
                                      *settings, "--quiet"])
    assert result.exit_code == 0, result.output
    stage = run_dir / "stages" / name
    trained = json.loads((run_dir / "metrics.json").read_text())["stages"][name]
    assert trained["teacher"] == name and trained["epochs_trained"] == 2
    assert len((stage / "curves.jsonl").read_text().splitlines()) == 2
    loaded = load_teacher_dir(stage / "model")
    assert loaded.name == name and loaded.config.epochs == 2
