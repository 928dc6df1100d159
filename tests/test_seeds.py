"""One seed rule for every stage kind: the recipe seed fills every unset seed, an explicit value wins."""

from __future__ import annotations

import copy

import pytest

from recalign.recipes import recipe_from_dict
from recalign.methods import STAGE_KINDS, get_stage
from recalign.stages import fill_seeds, seed_fields

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

# The smallest valid params of each kind (a kind missing here must validate with {}).
MINIMAL = {"teacher": {"model": "popularity"}, "reclmgen": {"teacher": "http://127.0.0.1:12621"}}
KINDS = sorted(STAGE_KINDS)


def load(kind: str, seed: int, params: dict, split: dict | None = None):
    return recipe_from_dict({"name": "seeds", "seed": seed, "data": {"source": "synthetic"},
                             "split": split or {"kind": "random"},
                             "stages": [{"name": "only", "kind": kind, "params": params}]})


def seeds_of(kind: str, recipe) -> dict[str, int | None]:
    """Every seed field of the stage's validated params, as the stage will see them at run time."""
    stage = get_stage(kind)
    return seed_fields(stage.params.model_validate(recipe.stages[0].params))


def with_value(params: dict, path: str, value: int) -> dict:
    """A copy of `params` with the dotted `path` set to `value`."""
    result = copy.deepcopy(params)
    node = result
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return result


@pytest.mark.parametrize("kind", KINDS)
def test_recipe_seed_fills_every_seed_of_every_stage_kind(kind):
    seven = seeds_of(kind, load(kind, 7, MINIMAL.get(kind, {})))
    assert seven, f"stage kind {kind!r} has no seed field"
    assert set(seven.values()) == {7}
    eight = seeds_of(kind, load(kind, 8, MINIMAL.get(kind, {})))
    assert eight.keys() == seven.keys() and set(eight.values()) == {8}  # the recipe seed changes every one


@pytest.mark.parametrize("kind", KINDS)
def test_an_explicit_seed_wins_for_every_seed_of_every_stage_kind(kind):
    base = MINIMAL.get(kind, {})
    paths = list(seeds_of(kind, load(kind, 7, base)))
    for path in paths:
        got = seeds_of(kind, load(kind, 7, with_value(base, path, 123)))
        assert got[path] == 123, path
        # an explicit `seed` also seeds the settings nested beside it; every other seed keeps the recipe's
        scope = path[:-len("seed")] if path.split(".")[-1] == "seed" else None
        for other, value in got.items():
            if other != path:
                expected = 123 if scope is not None and other.startswith(scope) else 7
                assert value == expected, (path, other)


def test_filled_seeds_survive_the_resolved_recipe(tmp_path):
    """config.yaml holds the seeds a run used, so re-loading it gives the same params."""
    from recalign.recipes import load_recipe

    recipe = load("trd", 4, {"dqn": {"seed": 9}})
    file = tmp_path / "resolved.yaml"
    file.write_text(recipe.to_yaml())
    again = load_recipe(file)
    assert again == recipe
    assert seeds_of("trd", again) == {"candidate_seed": 4, "dqn.seed": 9}


def test_teacher_seed_reaches_the_teacher_settings():
    from recalign.methods.teacher.config import TeacherStageConfig

    filled = load("teacher", 6, {"model": "bprmf", "epochs": 1}).stages[0].params
    assert TeacherStageConfig.model_validate(filled).teacher_settings() == {"epochs": 1, "seed": 6}
    nested = load("teacher", 6, {"model": "bprmf", "params": {"seed": 2}}).stages[0].params  # older nested form
    assert TeacherStageConfig.model_validate(nested).teacher_settings() == {"seed": 2}


def test_split_seed_follows_the_same_rule():
    assert load("teacher", 5, MINIMAL["teacher"]).split.seed == 5
    assert load("teacher", 5, MINIMAL["teacher"], split={"kind": "random", "seed": 1}).split.seed == 1


def test_null_counts_as_unset_and_models_are_not_changed_in_place():
    from recalign.methods.trd.config import TRDConfig

    config = TRDConfig.model_validate({"candidate_seed": None, "dqn": {"seed": 3}})
    filled = fill_seeds(config, 11)
    assert seed_fields(filled) == {"candidate_seed": 11, "dqn.seed": 3}
    assert seed_fields(config) == {"candidate_seed": None, "dqn.seed": 3}
