"""Teachers on small synthetic data whose structure says who must win: Popularity, BPR-MF, SASRec."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.data.dataset import Dataset, build_dataset
from recalign.errors import ConfigError, RecalignError
from recalign.teachers.bprmf import BPRMF
from recalign.teachers.popularity import Popularity
from recalign.teachers.registry import TEACHERS, get_teacher
from recalign.teachers.sasrec import SASRec

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


# ---- synthetic data --------------------------------------------------------------------------------------------

def _dataset(sequences: list[list[int]], n_items: int, categories: list[list[str]] | None = None) -> Dataset:
    """Dataset from per-user item sequences (dense ids 0..n_items-1 kept as original ids in order)."""
    rows = [(f"u{u}", str(i), t) for u, seq in enumerate(sequences) for t, i in enumerate(seq)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"item": [str(i) for i in range(n_items)],
                          "categories": categories or [[] for _ in range(n_items)]})
    return build_dataset(frame, items=items, name="synthetic", source="test")


def _latent_factor_data(seed: int = 0, n_users: int = 300, n_items: int = 120, groups: int = 6, length: int = 20):
    """Users of a taste group draw 90% of their items from that group's items (plus a mild global popularity)."""
    rng = np.random.default_rng(seed)
    item_group = rng.integers(groups, size=n_items)
    popularity = rng.pareto(2.0, size=n_items) + 1.0
    sequences = []
    for u in range(n_users):
        g = u % groups
        weights = popularity * np.where(item_group == g, 9.0 * groups, 1.0)
        sequences.append(list(rng.choice(n_items, size=length, replace=False, p=weights / weights.sum())))
    return _dataset(sequences, n_items)


def _successor_data(seed: int = 0, n_users: int = 200, n_items: int = 60, length: int = 12):
    """Every item has one successor (a random cycle); users walk it from random starts, jumping elsewhere 30% of
    the time, except that the last two steps (valid and test) always follow the successor. Order tells the next
    item; the set of items a user saw (all MF sees) only narrows it to the neighbours of several segments."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_items)
    successor = np.empty(n_items, dtype=np.int64)
    successor[cycle] = np.roll(cycle, -1)
    sequences = []
    while len(sequences) < n_users:
        item = int(rng.integers(n_items))
        seq = [item]
        while len(seq) < length:
            follow = len(seq) >= length - 2 or rng.random() < 0.7
            item = int(successor[item]) if follow else int(rng.integers(n_items))
            if item in seq:
                if follow:
                    break  # the forced successor was seen already: draw this user again
                continue
            seq.append(item)
        if len(seq) == length:
            sequences.append(seq)
    return _dataset(sequences, n_items)


def _leave_one_out(dataset: Dataset) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Last interaction of each user = test, second to last = valid, the rest = train."""
    frame = dataset.interactions.sort_values(["user_id", "timestamp"], kind="stable")
    rank_from_end = frame.groupby("user_id").cumcount(ascending=False)
    return frame[rank_from_end >= 2], frame[rank_from_end == 1], frame[rank_from_end == 0]


def _test_hit_rate(model, dataset: Dataset, train, valid, test, k: int = 10) -> float:
    """HR@k of the test item with history = train + valid excluded (full ranking)."""
    history = dataset.sequences(pd.concat([train, valid]))
    users = test["user_id"].to_numpy()
    items, _ = model.recommend(users, history, k)
    targets = torch.from_numpy(test["item_id"].to_numpy(dtype=np.int64, copy=True))
    return float((items == targets.unsqueeze(1)).any(1).float().mean())


SMALL_SASREC = dict(max_len=12, dim=32, blocks=2, heads=1, dropout=0.1, batch_size=50, epochs=40, lr=5e-3,
                    negatives=32)
SMALL_BPR = dict(dim=16, epochs=60, batch_size=512, lr=1e-2)


@pytest.fixture(scope="module")
def latent():
    data = _latent_factor_data()
    return (data, *_leave_one_out(data))


@pytest.fixture(scope="module")
def sequential():
    data = _successor_data()
    return (data, *_leave_one_out(data))


# ---- Popularity ------------------------------------------------------------------------------------------------

def test_popularity_counts_and_breaks_ties_by_item_id():
    data = _dataset([[2, 1, 3], [2, 3, 0], [1, 2]], n_items=5)
    model = Popularity().fit(data, data.interactions)
    assert model.counts_.tolist() == [1, 2, 3, 2, 0]
    empty = data.sequences(data.interactions.iloc[:0])
    items, scores = model.recommend([0], empty, k=5, exclude_history=False)
    assert items.tolist() == [[2, 1, 3, 0, 4]]  # items 1 and 3 tie at 2: lower id first
    assert scores.tolist() == [[3, 2, 2, 1, 0]]


# ---- recommend: candidates, history, category filters ----------------------------------------------------------

def test_recommend_candidates_history_and_category_filters():
    cats = [["A"], ["B"], ["A", "B"], ["B"], ["A"], []]
    # counts: item0 4, item1 3, item2 5, item3 1, item4 2, item5 0
    seqs = [[2, 0, 1, 4], [2, 0, 1], [2, 0, 4], [2, 0, 1, 3], [2]]
    data = _dataset(seqs, n_items=6, categories=cats)
    model = Popularity().fit(data, data.interactions)
    history = data.sequences(data.interactions[data.interactions["user_id"] == 4])  # user 4 saw item 2
    users = np.array([4, 0])
    items, _ = model.recommend(users, history, k=3)
    assert items.tolist() == [[0, 1, 4], [2, 0, 1]]  # user 0 has no history in `history`
    items, _ = model.recommend(users, history, k=3, exclude_history=False)
    assert items.tolist() == [[2, 0, 1], [2, 0, 1]]
    items, _ = model.recommend(users, history, k=3, category="+A")
    assert items.tolist() == [[0, 4, -1], [2, 0, 4]]  # only 3 A-items; item 2 excluded for user 4 -> padded
    items, _ = model.recommend(users, history, k=3, category="-A")
    assert items.tolist() == [[1, 3, 5], [1, 3, 5]]
    candidates = torch.tensor([[5, 2, 3, -1], [4, 3, 1, 5]])
    items, scores = model.recommend(users, history, k=3, candidates=candidates)
    assert items.tolist() == [[3, 5, -1], [1, 4, 3]]
    assert torch.isinf(scores[0, 2]) and scores[1].tolist() == [3, 2, 1]
    with pytest.raises(RecalignError, match="unknown category"):
        model.recommend(users, history, k=3, category="+Z")
    with pytest.raises(RecalignError, match="'\\+Name' or '-Name'"):
        model.recommend(users, history, k=3, category="A")


# ---- BPR-MF ----------------------------------------------------------------------------------------------------

def test_bprmf_loss_falls_and_beats_popularity_on_latent_factor_data(latent):
    data, train, valid, test = latent
    bpr = BPRMF(**SMALL_BPR).fit(data, train, progress=False)
    assert bpr.loss_history_[-1] < 0.5 * bpr.loss_history_[0]
    assert bpr.user_embeddings_.shape == (data.n_users, 16) and bpr.item_embeddings_.shape == (data.n_items, 16)
    pop = Popularity().fit(data, train)
    hr_bpr = _test_hit_rate(bpr, data, train, valid, test)
    hr_pop = _test_hit_rate(pop, data, train, valid, test)
    assert hr_bpr > hr_pop + 0.1, (hr_bpr, hr_pop)


def test_bprmf_early_stopping_keeps_best_valid_epoch(latent):
    data, train, valid, _ = latent
    model = BPRMF(**{**SMALL_BPR, "epochs": 200, "patience": 2, "lr": 5e-2}).fit(data, train, valid, progress=False)
    epochs, recalls = zip(*model.valid_history_)
    assert model.epochs_trained_ < 200  # a large lr overfits quickly, so it must stop early
    assert model.best_epoch_ == epochs[int(np.argmax(recalls))]
    assert model.epochs_trained_ - model.best_epoch_ == 2


# ---- SASRec ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss,logq", [("sampled_softmax", False), ("sampled_softmax", True), ("ce", False),
                                       ("bce", False)])
def test_sasrec_loss_falls(sequential, loss, logq):
    data, train, _, _ = sequential
    model = SASRec(**{**SMALL_SASREC, "epochs": 8, "loss": loss, "logq_correction": logq}).fit(
        data, train, progress=False)
    assert model.loss_history_[-1] < 0.7 * model.loss_history_[0], model.loss_history_


def test_sasrec_beats_bprmf_and_popularity_on_successor_data(sequential):
    data, train, valid, test = sequential
    sas = SASRec(**SMALL_SASREC).fit(data, train, valid, progress=False)
    bpr = BPRMF(**SMALL_BPR).fit(data, train, valid, progress=False)
    pop = Popularity().fit(data, train)
    hr = {name: _test_hit_rate(m, data, train, valid, test) for name, m in
          {"sasrec": sas, "bprmf": bpr, "popularity": pop}.items()}
    assert hr["sasrec"] > 0.8, hr  # the test item is always the successor of the last item
    assert hr["sasrec"] > hr["bprmf"] + 0.2 and hr["sasrec"] > hr["popularity"] + 0.5, hr


def test_sasrec_min_steps_delays_early_stopping_on_a_small_dataset(sequential, monkeypatch):
    """A validation check that never improves stops training after `patience` checks, but not before `min_steps`
    optimizer steps (a small dataset has few steps per epoch); the best state is still the first check's."""
    from recalign.teachers.training import ValidationRecall

    monkeypatch.setattr(ValidationRecall, "__call__", lambda self, score, chunk=1024: 0.1)
    data, train, valid, _ = sequential
    settings = {**SMALL_SASREC, "epochs": 30, "patience": 2}
    steps_per_epoch = int(np.ceil((train.groupby("user_id").size() >= 2).sum() / settings["batch_size"]))
    early = SASRec(**settings, min_steps=0).fit(data, train, valid, progress=False)
    assert (early.epochs_trained_, early.best_epoch_) == (3, 1)
    held = SASRec(**settings, min_steps=9 * steps_per_epoch + 1).fit(data, train, valid, progress=False)
    assert (held.epochs_trained_, held.best_epoch_) == (10, 1)


def test_sasrec_uses_only_the_last_max_len_items(sequential):
    data, train, _, _ = sequential
    model = SASRec(**{**SMALL_SASREC, "epochs": 2, "max_len": 4}).fit(data, train, progress=False)
    history = data.sequences(train)
    users = np.arange(5)
    trimmed = data.sequences(train.groupby("user_id").tail(4))  # train is time-sorted per user
    torch.testing.assert_close(model.score(users, history), model.score(users, trimmed))
    assert not torch.allclose(model.score(users, history), model.score(users, data.sequences(
        train.groupby("user_id").tail(3))))


# ---- persistence and determinism -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["popularity", "bprmf", "sasrec"])
def test_save_load_gives_identical_scores_and_same_seed_is_deterministic(sequential, tmp_path, name):
    data, train, valid, _ = sequential
    overrides = {"bprmf": {**SMALL_BPR, "epochs": 3}, "sasrec": {**SMALL_SASREC, "epochs": 2}}.get(name, {})
    cls = get_teacher(name)
    first = cls(seed=7, **overrides).fit(data, train, valid, progress=False)
    history = data.sequences(train)
    users = np.arange(data.n_users)
    scores = first.score(users, history)
    first.save(tmp_path / "model")
    loaded = cls.load(tmp_path / "model")
    torch.testing.assert_close(loaded.score(users, history), scores, rtol=0, atol=0)
    assert loaded.config == first.config
    again = cls(seed=7, **overrides).fit(data, train, valid, progress=False)
    torch.testing.assert_close(again.score(users, history), scores, rtol=0, atol=0)
    if name != "popularity":
        other = cls(seed=8, **overrides).fit(data, train, valid, progress=False)
        assert not torch.equal(other.score(users, history), scores)


# ---- configs and registry --------------------------------------------------------------------------------------

def test_registry_and_config_errors():
    assert {"popularity": Popularity, "bprmf": BPRMF, "sasrec": SASRec}.items() <= TEACHERS.items()
    assert get_teacher("sasrec") is SASRec
    with pytest.raises(ConfigError, match="unknown teacher 'gru4rec'.*bprmf, ease, item2vec, itemknn, neumf, popularity, sasrec"):
        get_teacher("gru4rec")
    with pytest.raises(ConfigError, match="hidden"):
        SASRec(hidden=64)
    with pytest.raises(ConfigError, match="loss"):
        SASRec(loss="softmax")
    with pytest.raises(ConfigError, match="dim"):
        BPRMF(dim=0)
    with pytest.raises(RecalignError, match="not fitted"):
        BPRMF().score([0], None)


# ---- the "teacher" recipe stage --------------------------------------------------------------------------------

def _stage_context(tmp_path, dataset):
    from recalign.config import DataConfig, EvalConfig, Recipe, StageConfig
    from recalign.data.split import leave_one_out_split
    from recalign.stages import RunContext

    recipe = Recipe(name="t", data=DataConfig(path=str(tmp_path / "data")), eval=EvalConfig(ks=[10]),
                    stages=[StageConfig(name="sas", kind="teacher", params={})])
    stage_dir = tmp_path / "run" / "stages" / "sas"
    stage_dir.mkdir(parents=True)
    return RunContext(run_dir=tmp_path / "run", stage_dir=stage_dir, dataset=dataset,
                      split=leave_one_out_split(dataset), seed=3, progress=False, recipe=recipe,
                      stage=recipe.stages[0])


def test_teacher_stage_fits_saves_and_evaluates(sequential, tmp_path):
    from recalign.teachers.registry import load_teacher_dir
    from recalign.methods import get_stage

    data = sequential[0]
    stage = get_stage("teacher")
    ctx = _stage_context(tmp_path, data)
    params = stage.params.model_validate({"model": "sasrec", "params": SMALL_SASREC})
    metrics = stage.run(ctx, params)
    assert metrics["teacher"] == "sasrec" and metrics["train_seconds"] > 0
    assert metrics["recall@10"] > 0.8  # the split is leave-one-out, so this is the synthetic test item
    loaded = load_teacher_dir(ctx.stage_dir / "model")
    assert isinstance(loaded, SASRec) and loaded.config.seed == 3  # the recipe seed is the default seed
    assert ctx.evaluate(loaded)["recall@10"] == metrics["recall@10"]
    # the training curve beside the model: one JSON row per epoch, and its plot
    rows = [json.loads(line) for line in (ctx.stage_dir / "curves.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, metrics["epochs_trained"] + 1))
    assert (ctx.stage_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (ctx.stage_dir / "model").iterdir()) == ["teacher.json", "tensors.pt"]


def test_teacher_stage_rejects_bad_params(sequential, tmp_path):
    from pydantic import ValidationError

    from recalign.methods.teacher.stage import TEACHER_STAGE

    ctx = _stage_context(tmp_path, sequential[0])
    with pytest.raises(ConfigError, match="field 'hidden'"):
        TEACHER_STAGE.run(ctx, TEACHER_STAGE.params(model="sasrec", params={"hidden": 8}))
    with pytest.raises(ConfigError, match="unknown teacher 'mf'"):
        TEACHER_STAGE.run(ctx, TEACHER_STAGE.params(model="mf"))
    with pytest.raises(ConfigError, match="field 'epocs'"):  # flat settings are checked like nested ones
        TEACHER_STAGE.run(ctx, TEACHER_STAGE.params(model="bprmf", epocs=3))
    with pytest.raises(ValidationError):
        TEACHER_STAGE.params(epochs=3)  # no teacher named
    assert not (ctx.stage_dir / "model").exists()


# ---- BPR-MF negatives, initialisation, threads -----------------------------------------------------------------

def test_negative_sampler_never_draws_a_training_item_of_the_user():
    from recalign.teachers.bprmf import NegativeSampler

    # user 0 saw items 0-7 of 10 (two negatives left), user 1 saw item 9 only
    users = torch.tensor([0] * 8 + [1])
    items = torch.tensor(list(range(8)) + [9])
    sampler = NegativeSampler(users, items, n_items=10, rounds=50)
    drawn = sampler.sample(torch.tensor([0] * 500 + [1] * 500), 3, torch.Generator().manual_seed(0))
    assert set(drawn[:500].flatten().tolist()) == {8, 9}
    assert set(drawn[500:].flatten().tolist()) == set(range(9))
    assert sampler.is_positive(torch.tensor([0, 1]), torch.tensor([[7, 8], [9, 0]])).tolist() == [[True, False],
                                                                                                    [True, False]]
    uniform = NegativeSampler(users, items, n_items=10, exclude=False)
    assert 0 in uniform.sample(torch.zeros(500, dtype=torch.long), 1, torch.Generator().manual_seed(0))


def test_bprmf_initialises_like_xavier_normal():
    from recalign.teachers.bprmf import xavier_normal

    table = xavier_normal(20000, 64, torch.Generator().manual_seed(0))
    assert abs(float(table.std()) - (2.0 / (20000 + 64)) ** 0.5) < 2e-4  # 0.0100 for a 20k catalog


def test_threads_setting_is_applied_and_restored(latent, monkeypatch):
    from recalign import threads

    data, train, valid, _ = latent
    seen = []

    class Spy(BPRMF):
        def score(self, users, history):
            seen.append(torch.get_num_threads())
            return super().score(users, history)

    assert torch.get_num_threads() == 1
    Spy(**{**SMALL_BPR, "epochs": 2, "threads": 2}).fit(data, train, valid, progress=False)
    assert seen and set(seen) == {2} and torch.get_num_threads() == 1
    with threads.torch_threads(None):  # None: the global default
        assert torch.get_num_threads() == threads.DEFAULT_THREADS == 1
    monkeypatch.setenv(threads.ENV_VAR, "2")
    assert threads.default_threads() == 2
    monkeypatch.setenv(threads.ENV_VAR, "zero")
    with pytest.raises(ConfigError, match="RECALIGN_THREADS"):
        threads.default_threads()
    with pytest.raises(ConfigError, match="threads"):
        BPRMF(threads=0)


# ---- measured defaults and the benchmarks that pin older ones ---------------------------------------------------

def test_bprmf_defaults_are_the_measured_ones():
    # BENCHMARKS.md "BPR-MF vs RecBole": RecBole's BPR settings with 128 factors (chosen on Beauty's validation recall)
    cfg = BPRMF().config
    assert (cfg.dim, cfg.lr, cfg.l2, cfg.batch_size, cfg.negatives) == (128, 1e-3, 0.0, 2048, 1)
    assert cfg.exclude_positives and cfg.init_std is None and cfg.patience == 30


def test_trd_benchmark_pins_every_bprmf_training_setting():
    # benchmarks/trd_ml100k.py must keep measuring the teacher its recorded table used, whatever the defaults become
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "trd_ml100k.py"
    spec = importlib.util.spec_from_file_location("trd_ml100k_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    not_training = {"seed", "threads", "max_train_seconds"}
    assert set(module.TEACHER_PARAMS) == set(BPRMF.Config.model_fields) - not_training
    cfg = BPRMF(**module.TEACHER_PARAMS).config
    assert (cfg.dim, cfg.lr, cfg.batch_size, cfg.init_std, cfg.exclude_positives, cfg.patience) == \
        (32, 5e-3, 4096, 0.1, False, 5)
