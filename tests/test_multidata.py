"""Multi-dataset recipes (datasets by role, cached in the run folder) and the cold-start split."""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pytest
from pydantic import BaseModel, ConfigDict

from recalign import stages
import recalign.methods as methods
from recalign.recipes import recipe_from_dict
from recalign.data.dataset import build_dataset
from recalign.data.split import cold_start_split
from recalign.errors import ConfigError
from recalign.stages import RunContext
from recalign.preparation import make_split
from recalign.runs import run_recipe

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

SEEN: dict[str, list] = {}


def synthetic(seed: int, n_users: int = 20) -> dict:
    return {"source": "synthetic", "options": {"n_users": n_users, "n_items": 30, "min_length": 4,
                                               "max_length": 8, "seed": seed}}


class RolesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = "pretrain"


def roles_run(ctx: RunContext, params: RolesConfig) -> dict:
    """Record the datasets of a role and the eval dataset."""
    found = ctx.datasets(params.role)
    SEEN["role"] = found
    SEEN["eval"] = ctx.datasets("eval")
    return {"n": len(found), "users": sum(d.n_users for d in found)}


@pytest.fixture(autouse=True)
def roles_stage_kind(monkeypatch):
    module = types.ModuleType("recalign_test_multidata_stages")
    module.ROLES = stages.Stage(params=RolesConfig, run=roles_run, reads=stages.DEFAULT_READS | {"datasets"})
    module.PLAIN = stages.Stage(params=RolesConfig, run=lambda ctx, params: {"n": 0})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(methods.STAGE_KINDS, "roles", module.ROLES)
    monkeypatch.setitem(methods.STAGE_KINDS, "plain", module.PLAIN)
    SEEN.clear()


def multi_recipe(pretrain_seeds=(1, 2), **extra):
    return recipe_from_dict({
        "name": "multi", "seed": 0,
        "datasets": {"pretrain": [synthetic(s) for s in pretrain_seeds], "eval": synthetic(9, n_users=12)},
        "stages": [{"name": "roles", "kind": "roles"}, {"name": "plain", "kind": "plain"}], **extra})


def test_roles_resolve_and_eval_is_the_split_dataset(tmp_path):
    recipe = multi_recipe()
    assert recipe.data.options["seed"] == 9 and list(recipe.datasets) == ["pretrain"]  # `eval` is `data`
    summary = run_recipe(recipe, tmp_path / "run", progress=False)
    assert summary["stages"]["roles"]["n"] == 2 and summary["stages"]["roles"]["users"] == 40
    first, second = SEEN["role"]
    assert first.fingerprint() != second.fingerprint()  # two domains, in the order the recipe names them
    assert SEEN["eval"][0].n_users == 12
    for i in (0, 1):
        assert (tmp_path / "run" / "data" / f"pretrain-{i}" / "prepare.json").is_file()
    assert (tmp_path / "run" / "data" / "pretrain-1" / "dataset.json").read_text().count('"seed": 2') == 1


def test_role_datasets_are_prepared_once_and_reused(tmp_path, monkeypatch):
    import recalign.data.sources as sources

    run_recipe(multi_recipe(), tmp_path / "run", progress=False)
    calls = []
    real = sources.prepare_source
    monkeypatch.setattr(sources, "prepare_source", lambda *a, **k: calls.append(a) or real(*a, **k))
    stamp = (tmp_path / "run" / "data" / "pretrain-0" / "dataset.json").stat().st_mtime_ns
    changed = multi_recipe(stages=[{"name": "roles", "kind": "roles"}, {"name": "plain", "kind": "plain",
                                                                        "params": {"role": "x"}}])
    run_recipe(changed, tmp_path / "run", progress=False)  # "roles" is done: skipped, nothing prepared
    assert calls == []
    (tmp_path / "run" / "stages" / "roles" / "DONE").unlink()
    run_recipe(changed, tmp_path / "run", progress=False)  # re-run "roles": its datasets come from the cache
    assert calls == [] and len(SEEN["role"]) == 2
    assert (tmp_path / "run" / "data" / "pretrain-0" / "dataset.json").stat().st_mtime_ns == stamp


def test_changing_a_role_dataset_reruns_only_the_stages_that_read_datasets(tmp_path):
    run_recipe(multi_recipe(), tmp_path / "run", progress=False)
    before = {n: (tmp_path / "run" / "stages" / n / "DONE").read_text() for n in ("roles", "plain")}
    summary = run_recipe(multi_recipe(pretrain_seeds=(1, 3, 4)), tmp_path / "run", progress=False)
    after = {n: (tmp_path / "run" / "stages" / n / "DONE").read_text() for n in ("roles", "plain")}
    assert summary["stages"]["roles"]["n"] == 3 and after["roles"] != before["roles"]
    assert after["plain"] == before["plain"]  # `plain` does not read `datasets`: same hash, not re-run


def test_unknown_role_is_a_config_error_listing_the_roles(tmp_path):
    recipe = multi_recipe(stages=[{"name": "roles", "kind": "roles", "params": {"role": "finetune"}}])
    with pytest.raises(ConfigError, match=r"datasets\.finetune: .*roles: eval, pretrain"):
        run_recipe(recipe, tmp_path / "run", progress=False)


def test_single_data_recipes_stay_valid_and_mean_role_eval(tmp_path):
    recipe = recipe_from_dict({"name": "one", "data": synthetic(3), "stages": [{"name": "roles", "kind": "roles",
                                                                               "params": {"role": "eval"}}]})
    assert recipe.datasets == {}
    run_recipe(recipe, tmp_path / "run", progress=False)
    assert SEEN["role"][0] is SEEN["eval"][0] and SEEN["role"][0].n_users == 20


@pytest.mark.parametrize("data, datasets, message", [
    (synthetic(0), {"eval": synthetic(1)}, "not both"),
    (None, {"eval": [synthetic(1), synthetic(2)]}, "exactly one"),
    (synthetic(0), {"pretrain": []}, "names no dataset"),
    (synthetic(0), {"pre/train": [synthetic(1)]}, "plain folder name"),
])
def test_bad_dataset_roles_are_config_errors(data, datasets, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({"name": "bad", **({"data": data} if data else {}), "datasets": datasets,
                          "stages": [{"name": "p", "kind": "plain"}]})


def test_a_recipe_needs_an_eval_dataset_and_role_sources_are_checked():
    with pytest.raises(ConfigError, match="missing 'data'"):
        recipe_from_dict({"name": "bad", "datasets": {"pretrain": [synthetic(1)]},
                          "stages": [{"name": "p", "kind": "plain"}]})
    with pytest.raises(ConfigError, match=r"datasets\.pretrain\.1\.source: unknown source 'nope'"):
        recipe_from_dict({"name": "bad", "data": synthetic(0), "datasets": {"pretrain": [synthetic(1), {"source": "nope"}]},
                          "stages": [{"name": "p", "kind": "plain"}]})
    with pytest.raises(ConfigError, match=r"datasets\.pretrain\.0\.options\.n_user: unknown key"):
        recipe_from_dict({"name": "bad", "data": synthetic(0), "datasets": {"pretrain": {"source": "synthetic",
                                                                                           "options": {"n_user": 3}}},
                          "stages": [{"name": "p", "kind": "plain"}]})


# ---- cold-start split --------------------------------------------------------------------------------

def toy_dataset():
    """Users with 1, 2, 3, 5 and 7 interactions; item = 10 * user + position, timestamps shuffled in the file."""
    rows = [(f"u{u}", f"i{10 * u + t}", 100 + t) for u, n in enumerate((1, 2, 3, 5, 7)) for t in range(n)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).sample(frac=1.0, random_state=0)
    return build_dataset(frame, name="toy", source="test")


def original(dataset, column: str, ids) -> list[str]:
    """The original ids (as in the file) of dense user or item ids."""
    table = dataset.items if column == "item" else dataset.users
    lookup = dict(zip(table[f"{column}_id"], table["original_id"]))
    return [lookup[i] for i in ids]


def test_cold_start_windows_hold_one_to_three_history_items_and_the_last_item_as_target():
    dataset = toy_dataset()
    for seed in range(6):
        split = cold_start_split(dataset, 2, 4, seed=seed)
        assert len(split.valid) == 0
        users = original(dataset, "user", split.test["user_id"].tolist())
        assert sorted(users) == ["u1", "u2", "u3", "u4"]  # u0 (one interaction) has no window
        for user_id, row in split.test.set_index("user_id").iterrows():
            name = original(dataset, "user", [user_id])[0]
            u, n = int(name[1:]), (1, 2, 3, 5, 7)[int(name[1:])]
            target = original(dataset, "item", [row["item_id"]])[0]
            assert target == f"i{10 * u + n - 1}"  # the user's last interaction ends the window
            history = split.train[split.train["user_id"] == user_id].sort_values("timestamp")
            items = original(dataset, "item", history["item_id"].tolist())
            assert 1 <= len(items) <= min(3, n - 1)
            # the history is the window minus its last item: the items right before the target, in order
            assert items == [f"i{10 * u + t}" for t in range(n - 1 - len(items), n - 1)]
        assert split.info["users_dropped"] == 1 and split.info["window"] == [2, 4]


def test_cold_start_window_lengths_are_seeded_and_cover_the_range():
    dataset = toy_dataset()
    lengths = {seed: cold_start_split(dataset, 2, 4, seed=seed).train.groupby("user_id").size().to_dict()
               for seed in range(12)}
    assert lengths[3] == cold_start_split(dataset, 2, 4, seed=3).train.groupby("user_id").size().to_dict()
    seven_items = original(dataset, "user", [0, 1, 2, 3, 4]).index("u4")
    assert {by_user[seven_items] for by_user in lengths.values()} == {1, 2, 3}  # windows of 2, 3 and 4 items
    fixed = cold_start_split(dataset, 3, 3, seed=0)
    assert fixed.train.groupby("user_id").size().tolist() == [2, 2, 2]  # u1 (2 items) is dropped below min 3


def test_cold_start_split_from_a_recipe_and_its_errors(tmp_path):
    dataset = toy_dataset()
    recipe = recipe_from_dict({"name": "cs", "seed": 4, "data": synthetic(0),
                               "split": {"kind": "cold_start", "window": [2, 3]},
                               "stages": [{"name": "p", "kind": "plain"}]})
    _, split = make_split(dataset, recipe.split, recipe.seed)
    assert split.info["window"] == [2, 3] and split.info["seed"] == 4
    assert split.train.groupby("user_id").size().max() <= 2
    _, default = make_split(dataset, recipe.split.model_copy(update={"window": None}), 0)
    assert default.info["window"] == [2, 4]
    for bad in ([1, 3], [4, 2], [2]):
        with pytest.raises(ConfigError, match=r"split\.window"):
            recipe_from_dict({"name": "cs", "data": synthetic(0), "split": {"kind": "cold_start", "window": bad},
                              "stages": [{"name": "p", "kind": "plain"}]})
    with pytest.raises(ConfigError, match="only cold_start takes a window"):
        make_split(dataset, recipe.split.model_copy(update={"kind": "random"}), 0)
    with pytest.raises(ConfigError, match="cold_start takes no fractions"):
        make_split(dataset, recipe.split.model_copy(update={"fractions": [0.5, 0.5]}), 0)
    assert np.isin(split.test["item_id"], split.train["item_id"]).sum() == 0  # targets never in a history
