"""The Python API: `import recalign` is light, and the README's notebook session works as written (tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import recalign

torch.set_num_threads(1)

RECIPE = """
name: my-run
data: {source: synthetic, options: {n_users: 300, n_items: 120}}
split: {kind: leave_one_out}
eval: {ks: [5, 10]}
stages:
  - {name: popularity, kind: teacher, params: {model: popularity}}
  - {name: bprmf, kind: teacher, params: {model: bprmf, dim: 16, epochs: 60, lr: 0.01, batch_size: 512}}
"""


def test_import_is_lazy_and_does_not_load_torch():
    code = ("import sys, recalign; heavy = [m for m in ('torch', 'pandas', 'recalign.data', 'recalign.teachers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_resolves():
    for name in recalign.__all__:
        assert getattr(recalign, name) is not None, name
        assert name in dir(recalign)
    assert recalign.get_teacher("bprmf") is recalign.BPRMF
    assert issubclass(recalign.SASRec, recalign.Recommender)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        recalign.nothing_here  # noqa: B018


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The README session up to `fit`: prepare, save, load, split, fit Popularity and BPR-MF."""
    folder = tmp_path_factory.mktemp("api")
    prepared = recalign.prepare_source("synthetic", n_users=300, n_items=120, seed=0)
    prepared.save(folder / "data" / "synth")
    dataset = recalign.Dataset.load(folder / "data" / "synth")
    split = recalign.leave_one_out_split(dataset)
    popularity = recalign.Popularity().fit(dataset, split.train)
    bprmf = recalign.BPRMF(dim=16, epochs=60, lr=0.01, batch_size=512).fit(
        dataset, split.train, split.valid, valid_history=split.history("valid"), progress=False)
    return {"folder": folder, "prepared": prepared, "dataset": dataset, "split": split,
            "popularity": popularity, "bprmf": bprmf}


def test_prepare_save_load_and_split(session):
    dataset, split = session["dataset"], session["split"]
    assert dataset.fingerprint() == session["prepared"].fingerprint()
    assert (dataset.n_users, dataset.n_items) == (300, 120)
    # Every synthetic user has >= 10 interactions, so leave-one-out gives each one valid and one test row.
    assert split.info["sizes"] == {"train": len(dataset.interactions) - 600, "valid": 300, "test": 300}


def test_fitted_bprmf_beats_popularity(session):
    dataset, split = session["dataset"], session["split"]
    pop = recalign.evaluate(session["popularity"], dataset, split, ks=[10], progress=False)
    bpr = recalign.evaluate(session["bprmf"], dataset, split, ks=[10], progress=False)
    assert pop["n_users"] == bpr["n_users"] == 300
    # Category preferences and successors are there to be learned; popularity ignores the user.
    assert bpr["ndcg@10"] > 1.2 * pop["ndcg@10"]
    assert bpr["hr@10"] > pop["hr@10"]


def test_recommend_excludes_history_and_filters_category(session):
    dataset, split, bprmf = session["dataset"], session["split"], session["bprmf"]
    history = dataset.sequences(split.history("test"))
    items, scores = bprmf.recommend([0, 1, 2], history, k=5)
    assert items.shape == (3, 5)
    assert len({dataset.titles()[i] for i in items[0].tolist()}) == 5
    for row, user in enumerate([0, 1, 2]):
        assert not set(items[row].tolist()) & set(history[user].tolist())
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    mystery = set(dataset.category_index()["Mystery"].tolist())
    only_mystery = bprmf.recommend([0], history, k=5, category="+Mystery")[0]
    assert set(only_mystery[0].tolist()) <= mystery - set(history[0].tolist())


def test_popularity_recommends_most_counted_unseen_items(session):
    dataset, split = session["dataset"], session["split"]
    history = dataset.sequences(split.history("test"))
    counts = np.bincount(split.train["item_id"].to_numpy(), minlength=dataset.n_items)
    unseen = np.setdiff1d(np.arange(dataset.n_items), history[0])
    # most counted first, ties by ascending item id
    expected = unseen[np.lexsort((unseen, -counts[unseen]))][:5]
    items, _ = session["popularity"].recommend([0], history, k=5)
    assert items[0].tolist() == expected.tolist()


def test_save_load_round_trip(session):
    dataset, split, bprmf = session["dataset"], session["split"], session["bprmf"]
    history = dataset.sequences(split.history("test"))
    folder = bprmf.save(session["folder"] / "models" / "bprmf")
    assert sorted(p.name for p in folder.iterdir()) == ["teacher.json", "tensors.pt"]
    assert json.loads((folder / "teacher.json").read_text())["teacher"] == "bprmf"
    same = recalign.get_teacher("bprmf").load(folder)
    assert torch.equal(same.score([0, 1, 2], history), bprmf.score([0, 1, 2], history))
    assert torch.equal(same.recommend([0, 1, 2], history, k=5)[0], bprmf.recommend([0, 1, 2], history, k=5)[0])
    with pytest.raises(recalign.RecalignError, match="holds a bprmf teacher"):
        recalign.SASRec.load(folder)


def readme_python_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_session_runs_as_written(tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    assert len(blocks) == 2 and "recalign.evaluate(" in blocks[0] and "recalign.run_recipe(" in blocks[1]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102  (our own README, run on purpose)
    assert namespace["split"].info["sizes"] == {"train": len(namespace["dataset"].interactions) - 600,
                                                "valid": 300, "test": 300}
    history = namespace["history"]
    assert torch.equal(namespace["same"].score([0, 1, 2], history), namespace["bprmf"].score([0, 1, 2], history))
    assert namespace["teacher"].name == "bprmf"
    assert (tmp_path / "runs" / "my-run" / "report.md").is_file()


def test_run_recipe_from_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("my-recipe.yaml").write_text(RECIPE)
    recipe = recalign.load_recipe("my-recipe.yaml", ["seed=1"])
    summary = recalign.run_recipe(recipe, "runs/my-run", progress=False)
    assert list(summary["stages"]) == ["popularity", "bprmf"]
    run = tmp_path / "runs" / "my-run"
    assert json.loads((run / "metrics.json").read_text())["stages"]["bprmf"]["ndcg@10"] == \
        summary["stages"]["bprmf"]["ndcg@10"]
    # The saved teacher, evaluated on the run's own dataset and split, gives the metrics the run recorded.
    dataset = recalign.Dataset.load(run / "data")
    split = recalign.leave_one_out_split(dataset)
    teacher = recalign.load_teacher_dir(run / "stages" / "bprmf" / "model")
    again = recalign.evaluate(teacher, dataset, split, ks=[5, 10], progress=False)
    assert again["ndcg@10"] == summary["stages"]["bprmf"]["ndcg@10"]
    with pytest.raises(recalign.ConfigError, match="unknown key"):
        recalign.load_recipe("my-recipe.yaml", ["stages.bprmf.params.epoch=3"])
