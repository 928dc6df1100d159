"""ItemKNN and EASE: hand-computed similarities, the closed form against a direct solve, planted structure,
save/load, the catalog limit, threads and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.split import leave_one_out_split
from recalign.errors import ConfigError
from recalign.eval.evaluate import evaluate
from recalign.teachers.ease import EASE
from recalign.teachers.itemknn import ItemKNN
from recalign.teachers.popularity import Popularity
from recalign.teachers.registry import TEACHERS, get_teacher, load_teacher_dir

pytestmark = pytest.mark.fast


def _dataset(sequences: list[list[int]], n_items: int) -> Dataset:
    """Dataset from per-user item sequences; item i keeps dense id i (the items frame lists them in order)."""
    rows = [(f"u{u}", f"i{i}", t) for u, seq in enumerate(sequences) for t, i in enumerate(seq)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"item": [f"i{i}" for i in range(n_items)]})
    return build_dataset(frame, items=items, name="synthetic", source="test")


def _block_data(seed: int = 0, n_users: int = 300, n_items: int = 120, blocks: int = 6, length: int = 15):
    """Items come in co-occurring blocks: a user draws 90% of their items from one block, with a global
    popularity skew that Popularity alone follows."""
    rng = np.random.default_rng(seed)
    item_block = np.arange(n_items) % blocks
    popularity = rng.pareto(2.0, size=n_items) + 1.0
    sequences = []
    for u in range(n_users):
        weights = popularity * np.where(item_block == u % blocks, 9.0 * blocks, 1.0)
        sequences.append(list(rng.choice(n_items, size=length, replace=False, p=weights / weights.sum())))
    return _dataset(sequences, n_items)


# 4 users x 4 items:  u0 {0, 1, 2}, u1 {0, 1}, u2 {1, 2, 3}, u3 {0, 3}
# users per item |U_i|: 3, 3, 2, 2; shared users: (0,1) 2, (0,2) 1, (0,3) 1, (1,2) 2, (1,3) 1, (2,3) 1
# shrink 1: sim(0,1) = 2 / (3 + 1) = 0.5              sim(0,2) = sim(0,3) = 1 / (sqrt 6 + 1) = 0.289898
#           sim(1,2) = 2 / (sqrt 6 + 1) = 0.579796    sim(1,3) = 1 / (sqrt 6 + 1) = 0.289898
#           sim(2,3) = 1 / (2 + 1) = 0.333333
# shrink 0: 2/3, 1/sqrt 6 = 0.408248 (0,2), (0,3), (1,3); 2/sqrt 6 = 0.816497 (1,2); 1/2 (2,3)
HAND = [[0, 1, 2], [0, 1], [1, 2, 3], [0, 3]]
R6 = 6 ** 0.5


def test_itemknn_similarities_and_shrinkage_match_the_formula():
    data = _dataset(HAND, 4)
    full = ItemKNN(k=3, shrink=1.0).fit(data, data.interactions).similarity_matrix()
    a, b, c, d = 0.5, 1 / (R6 + 1), 2 / (R6 + 1), 1 / 3
    expected = torch.tensor([[0, a, b, b], [a, 0, c, b], [b, c, 0, d], [b, b, d, 0]])
    torch.testing.assert_close(full, expected)
    no_shrink = ItemKNN(k=3, shrink=0.0).fit(data, data.interactions).similarity_matrix()
    e, f = 1 / R6, 2 / R6
    torch.testing.assert_close(no_shrink, torch.tensor([[0, 2 / 3, e, e], [2 / 3, 0, f, e], [e, f, 0, 0.5],
                                                        [e, e, 0.5, 0]]))


def test_itemknn_keeps_each_items_top_k_and_scores_from_them():
    data = _dataset(HAND, 4)
    model = ItemKNN(k=2, shrink=1.0).fit(data, data.interactions)
    # column j keeps j's 2 nearest items: 0 -> {1, 2} (2 and 3 tie: lower id), 1 -> {2, 0}, 2 -> {1, 3}, 3 -> {2, 0}
    assert model.neighbours_.tolist() == [[1, 2], [2, 0], [1, 3], [2, 0]]
    a, b, c, d = 0.5, 1 / (R6 + 1), 2 / (R6 + 1), 1 / 3
    expected = torch.tensor([[0, a, 0, b], [a, 0, c, 0], [b, c, 0, d], [0, 0, d, 0]])
    sim = model.similarity_matrix()
    torch.testing.assert_close(sim, expected)
    assert ((sim != 0).sum(0) <= 2).all()
    # score(u) = sum over the history of sim(h, .): a history {0} scores item 1 by 0.5, item 3 by sim(0,3)
    history = data.sequences(data.interactions[data.interactions["user_id"] == 1])  # u1: {0, 1}
    torch.testing.assert_close(model.score([1], history), (expected[0] + expected[1]).unsqueeze(0))
    one = ItemKNN(k=1, shrink=1.0).fit(data, data.interactions)
    assert one.neighbours_.flatten().tolist() == [1, 2, 1, 2] and ((one.similarity_matrix() != 0).sum(0) == 1).all()


def _binary_matrix(data: Dataset) -> torch.Tensor:
    x = torch.zeros(data.n_users, data.n_items, dtype=torch.float64)
    x[torch.from_numpy(data.interactions["user_id"].to_numpy(dtype=np.int64, copy=True)),
      torch.from_numpy(data.interactions["item_id"].to_numpy(dtype=np.int64, copy=True))] = 1.0
    return x


@pytest.mark.parametrize("l2,precision", [(3.0, torch.float32), (1e-3, torch.float64)])
def test_ease_closed_form_equals_the_constrained_least_squares_solution(monkeypatch, l2, precision):
    rng = np.random.default_rng(3)
    n_users, n_items = 40, 9
    dense = rng.random((n_users, n_items)) < 0.35
    dense[np.arange(n_users), np.arange(n_users) % n_items] = True  # every user and item has an interaction
    data = _dataset([list(np.flatnonzero(row)) for row in dense], n_items)
    cholesky, used = torch.linalg.cholesky, []
    monkeypatch.setattr(torch.linalg, "cholesky", lambda a: used.append(a.dtype) or cholesky(a))
    model = EASE(l2=l2).fit(data, data.interactions)
    # condition bound (largest row sum of XᵀX + l2) / l2: below 1e4 for l2 = 3 (float32), far above for 1e-3
    assert used == [precision]
    x = _binary_matrix(data)
    assert int(x.sum()) == int(dense.sum()) and model.weights_.dtype == torch.float32
    weights = model.weights_.double()
    assert torch.count_nonzero(torch.diagonal(weights)) == 0
    for j in range(n_items):  # min ||X_j - X B_j||^2 + l2 ||B_j||^2 with B_jj = 0: drop column j and solve
        others = [i for i in range(n_items) if i != j]
        a = x[:, others]
        direct = torch.linalg.solve(a.T @ a + l2 * torch.eye(n_items - 1, dtype=torch.float64), a.T @ x[:, j])
        torch.testing.assert_close(weights[others, j], direct, rtol=1e-5, atol=1e-6)
    history = data.sequences(data.interactions)
    torch.testing.assert_close(model.score(np.arange(n_users), history).double(), x @ weights, rtol=1e-5,
                               atol=1e-6)


@pytest.fixture(scope="module")
def blocks():
    data = _block_data()
    return data, leave_one_out_split(data)


@pytest.mark.parametrize("name,settings", [("itemknn", {"k": 20, "shrink": 10.0}), ("ease", {"l2": 50.0}),
                                           ("itemknn", {}), ("ease", {})])
def test_beats_popularity_on_co_occurring_blocks(blocks, name, settings):
    data, split = blocks
    model = get_teacher(name)(seed=1, **settings).fit(data, split.train, split.valid, progress=False)
    popularity = Popularity().fit(data, split.train)
    hr = {key: evaluate(m, data, split, ks=[10], progress=False)["hr@10"]
          for key, m in {"model": model, "popularity": popularity}.items()}
    assert hr["model"] > hr["popularity"] + 0.4, hr  # about 0.78 against 0.09 (seed 0)


@pytest.mark.parametrize("name", ["itemknn", "ease"])
def test_save_load_gives_identical_scores_and_refit_is_deterministic(blocks, tmp_path, name):
    data, split = blocks
    cls = get_teacher(name)
    first = cls(seed=7).fit(data, split.train, split.valid, progress=False)
    assert not hasattr(first, "curve_")  # no epochs, no curves
    history = data.sequences(split.train)
    users = np.arange(data.n_users)
    scores = first.score(users, history)
    first.save(tmp_path / "model")
    for loaded in (cls.load(tmp_path / "model"), load_teacher_dir(tmp_path / "model")):
        assert type(loaded) is cls and loaded.config == first.config
        torch.testing.assert_close(loaded.score(users, history), scores, rtol=0, atol=0)
        items, _ = loaded.recommend(users[:5], history, 10)
        assert torch.equal(items, first.recommend(users[:5], history, 10)[0])
    again = cls(seed=7).fit(data, split.train, split.valid, progress=False)
    torch.testing.assert_close(again.score(users, history), scores, rtol=0, atol=0)


def test_ease_over_the_item_limit_is_a_one_line_config_error_before_any_matrix(monkeypatch):
    import recalign.teachers.ease as ease_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("EASE started building its matrices")

    monkeypatch.setattr(ease_module, "interaction_pairs", must_not_run)
    monkeypatch.setattr(ease_module, "cooccurrence_blocks", must_not_run)
    data = _dataset([[0, 1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11]], n_items=12)
    with pytest.raises(ConfigError, match="12 items.*max_items=10") as error:
        EASE(max_items=10).fit(data, data.interactions)
    assert "\n" not in str(error.value)
    assert not hasattr(EASE(max_items=10), "weights_")
    assert EASE().config.max_items == 30000 and EASE().config.l2 == 500.0


def test_registry_and_settings():
    assert TEACHERS["itemknn"] is ItemKNN and TEACHERS["ease"] is EASE
    cfg = ItemKNN().config
    assert (cfg.k, cfg.shrink, cfg.similarity) == (100, 0.0, "cosine")
    for bad in ({"k": 0}, {"shrink": -1.0}, {"similarity": "jaccard"}, {"neighbours": 5}):
        with pytest.raises(ConfigError):
            ItemKNN(**bad)
    for bad in ({"l2": 0.0}, {"max_items": 0}, {"lambda": 1.0}):
        with pytest.raises(ConfigError):
            EASE(**bad)


@pytest.mark.parametrize("cls", [ItemKNN, EASE])
def test_threads_setting_is_applied_in_fit_and_score(blocks, monkeypatch, cls):
    import recalign.teachers.ease as ease_module
    import recalign.teachers.itemknn as knn_module

    data, split = blocks
    seen = []
    module = knn_module if cls is ItemKNN else ease_module
    for name in ("cooccurrence_blocks", "history_matrix"):
        original = getattr(module, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(torch.get_num_threads())
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    assert torch.get_num_threads() == 1
    model = cls(threads=2).fit(data, split.train)
    model.score(np.arange(3), data.sequences(split.train))
    assert seen == [2, 2] and torch.get_num_threads() == 1


@pytest.mark.parametrize("name,setting", [("itemknn", "k=5"), ("ease", "l2=20")])
def test_teacher_train_from_the_cli(tmp_path, name, setting):
    from typer.testing import CliRunner

    from recalign.cli import app

    rng = np.random.default_rng(1)
    frame = pd.DataFrame([(f"u{u}", f"i{int(rng.integers(15))}", t) for u in range(10) for t in range(5)],
                         columns=["user", "item", "timestamp"])
    prepared = build_dataset(frame, name="tiny", source="test").save(tmp_path / "tiny")
    run_dir = tmp_path / name
    runner = CliRunner()
    result = runner.invoke(app, ["teacher", "train", name, "--data", str(prepared), "--out", str(run_dir),
                                 "--quiet", setting])
    assert result.exit_code == 0, result.output
    stage = run_dir / "stages" / name
    assert sorted(p.name for p in (stage / "model").iterdir()) == ["teacher.json", "tensors.pt"]
    assert not (stage / "curves.jsonl").exists()
    trained = json.loads((run_dir / "metrics.json").read_text())["stages"][name]
    assert trained["teacher"] == name and trained["n_users"] == 10
    result = runner.invoke(app, ["eval", str(run_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"{trained['hr@10']:.4f}" in result.stdout  # the saved model gives the same numbers
