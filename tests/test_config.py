"""Recipes: YAML loading, `key=value` overrides, and errors that name the file and the full dotted key."""

from __future__ import annotations

import sys
import types

import pytest
from pydantic import BaseModel, ConfigDict

from recalign import stages
import recalign.methods as methods
from recalign.config import apply_overrides, parse_override
from recalign.recipes import load_recipe, recipe_from_dict
from recalign.errors import ConfigError

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = 3
    lr: float = 0.01
    teacher: str | None = None


@pytest.fixture(autouse=True)
def toy_stage_kind(monkeypatch):
    """Register a stage kind `toy` whose params model is ToyConfig."""
    module = types.ModuleType("recalign_test_config_stages")
    module.TOY = stages.Stage(params=ToyConfig, run=lambda ctx, params: {})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(methods.STAGE_KINDS, "toy", module.TOY)


RECIPE = """\
name: unit
seed: 1
data:
  source: synthetic
  options: {n_users: 30}
split:
  kind: leave_one_out
eval:
  ks: [5, 10]
stages:
  - name: first
    kind: toy
    params: {epochs: 2}
  - name: second
    kind: toy
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_fills_defaults_and_validates_stage_params(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE))
    assert recipe.name == "unit" and recipe.seed == 1
    assert recipe.eval.ks == [5, 10] and recipe.eval.protocol == "full" and recipe.eval.n_negatives == 100
    assert recipe.eval.exclude_history is True
    assert recipe.stage("first").params == {"epochs": 2, "lr": 0.01, "teacher": None}
    assert recipe.stage("second").params["epochs"] == 3
    assert recipe.data.options == {"n_users": 30}


def test_overrides_address_stages_by_name_and_parse_yaml_scalars(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE), [
        "seed=3", "stages.second.params.epochs=5", "eval.ks=[1,20]", "stages.first.params.lr=1e-3",
        "eval.protocol=sampled", "data.options.n_items=40", "stages.second.params.teacher=first"])
    assert recipe.seed == 3
    assert recipe.stage("second").params["epochs"] == 5
    assert recipe.stage("first").params["lr"] == pytest.approx(1e-3)
    assert recipe.eval.ks == [1, 20] and recipe.eval.protocol == "sampled"
    assert recipe.data.options == {"n_users": 30, "n_items": 40}
    assert recipe.stage("second").params["teacher"] == "first"


def test_parse_override_values():
    assert parse_override("a.b=5") == (["a", "b"], 5)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=[5, 10]") == (["x"], [5, 10])
    assert parse_override("x=hello") == (["x"], "hello")
    assert parse_override("x=") == (["x"], "")
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="key=value"):
            parse_override(bad)


def test_apply_overrides_does_not_touch_the_input():
    raw = {"stages": [{"name": "s", "kind": "toy", "params": {"epochs": 1}}]}
    changed = apply_overrides(raw, ["stages.s.params.epochs=4"])
    assert raw["stages"][0]["params"]["epochs"] == 1 and changed["stages"][0]["params"]["epochs"] == 4


@pytest.mark.parametrize("override, key", [
    ("stages.first.params.epocs=5", "stages.first.params.epocs"),
    ("eval.kss=[5]", "eval.kss"),
    ("colour=red", "colour"),
])
def test_unknown_override_key_names_full_dotted_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, RECIPE), [override])
    message = str(info.value)
    assert f"{key}: unknown key" in message and "recipe.yaml" in message and "\n" not in message


def test_unknown_stage_in_override_lists_stages(tmp_path):
    with pytest.raises(ConfigError, match="no stage named 'third'.*first, second"):
        load_recipe(write(tmp_path, RECIPE), ["stages.third.params.epochs=1"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, RECIPE.replace("  ks: [5, 10]", "  ks: [5, 10]\n  metric: hr"))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: eval\.metric: unknown key"):
        load_recipe(path)
    path = write(tmp_path, RECIPE.replace("params: {epochs: 2}", "params: {epochs: 2, dropout: 0.1}"))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: stages\.first\.params\.dropout: unknown key"):
        load_recipe(path)


def test_bad_value_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.second\.params\.epochs: .*'many'"):
        load_recipe(write(tmp_path, RECIPE), ["stages.second.params.epochs=many"])
    with pytest.raises(ConfigError, match=r"split\.kind"):
        load_recipe(write(tmp_path, RECIPE), ["split.kind=by_moon_phase"])


def test_unknown_stage_kind_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.second\.kind: unknown stage kind 'magic'.*teacher.*toy"):
        load_recipe(write(tmp_path, RECIPE.replace("    kind: toy\n", "    kind: magic\n").replace(
            "    kind: magic\n    params", "    kind: toy\n    params")))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    broken = RECIPE.replace("  ks: [5, 10]", "  ks: [5, 10")
    with pytest.raises(ConfigError, match=r"recipe\.yaml:\d+: invalid YAML"):
        load_recipe(write(tmp_path, broken))
    tabbed = "name: x\nseed: 1\ndata:\n\tsource: synthetic\n"
    with pytest.raises(ConfigError, match=r"recipe\.yaml:4: invalid YAML"):
        load_recipe(write(tmp_path, tabbed))


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_recipe(write(tmp_path, "- just\n- a list\n"))


def test_data_needs_exactly_one_origin():
    base = {"name": "x", "stages": []}
    with pytest.raises(ConfigError, match="exactly one of 'source'"):
        recipe_from_dict({**base, "data": {"source": "synthetic", "path": "somewhere"}})
    with pytest.raises(ConfigError, match="exactly one of 'source'"):
        recipe_from_dict({**base, "data": {}})
    with pytest.raises(ConfigError, match="missing required key"):
        recipe_from_dict({"name": "x"})


def test_duplicate_stage_names_and_bad_fractions():
    stage = {"name": "a", "kind": "toy"}
    with pytest.raises(ConfigError, match="two stages are named 'a'"):
        recipe_from_dict({"name": "x", "data": {"source": "synthetic"}, "stages": [stage, stage]})
    with pytest.raises(ConfigError, match="sum to 1"):
        recipe_from_dict({"name": "x", "data": {"source": "synthetic"},
                          "split": {"kind": "random", "fractions": [0.5, 0.1, 0.1]}})


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE), ["seed=9"])
    again = load_recipe(write(tmp_path, recipe.to_yaml(), "resolved.yaml"))
    assert again == recipe


def test_teacher_settings_are_checked_when_the_recipe_loads(tmp_path):
    text = ("name: t\ndata: {source: synthetic}\nstages:\n"
            "  - {name: sasrec, kind: teacher, params: {model: sasrec, params: {epochs: 2}}}\n")
    recipe = load_recipe(write(tmp_path, text), ["stages.sasrec.params.params.dim=16"])
    assert recipe.stage("sasrec").params == {"model": "sasrec", "params": {"epochs": 2, "dim": 16}, "seed": 0}
    with pytest.raises(ConfigError, match=r"recipe\.yaml \(override\): stages\.sasrec\.params\.params\.epocs: "
                                          r"unknown key"):
        load_recipe(write(tmp_path, text), ["stages.sasrec.params.params.epocs=5"])
    with pytest.raises(ConfigError, match=r"stages\.sasrec\.params: unknown teacher 'gru4rec'.*sasrec"):
        load_recipe(write(tmp_path, text), ["stages.sasrec.params.model=gru4rec"])


def test_flat_teacher_settings_are_checked_and_win_over_nested_ones(tmp_path):
    from recalign.methods.teacher.config import TeacherStageConfig

    text = ("name: t\ndata: {source: synthetic}\nstages:\n"
            "  - {name: sasrec, kind: teacher, params: {model: sasrec, epochs: 2, params: {epochs: 9, dim: 8}}}\n")
    recipe = load_recipe(write(tmp_path, text), ["stages.sasrec.params.blocks=1"])
    params = TeacherStageConfig.model_validate(recipe.stage("sasrec").params)
    assert params.teacher_settings() == {"epochs": 2, "dim": 8, "blocks": 1, "seed": 0}  # the recipe seed filled
    with pytest.raises(ConfigError, match=r"recipe\.yaml \(override\): stages\.sasrec\.params\.epocs: unknown key"):
        load_recipe(write(tmp_path, text), ["stages.sasrec.params.epocs=5"])
    with pytest.raises(ConfigError, match=r"stages\.sasrec\.params\.dim: .*integer"):
        load_recipe(write(tmp_path, text), ["stages.sasrec.params.dim=big"])


def test_data_source_and_options_are_checked_when_the_recipe_loads(tmp_path):
    path = write(tmp_path, RECIPE)
    with pytest.raises(ConfigError, match=r"recipe\.yaml \(override\): data\.options\.n_user: unknown key"):
        load_recipe(path, ["data.options.n_user=5"])
    with pytest.raises(ConfigError, match=r"recipe\.yaml: data\.source: unknown source 'netflix'.*synthetic"):
        load_recipe(write(tmp_path, RECIPE.replace("source: synthetic", "source: netflix")))
    with pytest.raises(ConfigError, match=r"data\.raw: source 'movielens-100k' needs"):
        load_recipe(path, ["data.source=movielens-100k", "data.options={}"])


# ---- issue 9: run names, empty or duplicate stages, huge input echoed ---------------------------------------

@pytest.mark.parametrize("name, fragment", [
    ("../../x", "plain folder name"), ("a/b", "plain folder name"), ("a\\b", "plain folder name"),
    ("..", "must not start with '.'"), (".hidden", "must not start with '.'"), ("", "must not be empty"),
    ("a\x00b", "control characters"), ("tab\there", "control characters"), ("n" * 101, "at most 100 characters"),
])
def test_run_name_must_be_a_plain_folder_name(name, fragment):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"name": name, "data": {"source": "synthetic"}, "stages": [{"name": "a", "kind": "toy"}]})
    message = str(info.value)
    assert message.startswith("<recipe>: name: ") and fragment in message, message
    assert "\n" not in message and len(message) < 200  # a 101-character name is not echoed in full
    assert recipe_from_dict({"name": "n" * 100, "data": {"source": "synthetic"},
                             "stages": [{"name": "a", "kind": "toy"}]}).name == "n" * 100


def test_a_recipe_needs_at_least_one_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.yaml \(override\): stages: a recipe needs at least one stage$"):
        load_recipe(write(tmp_path, RECIPE), ["stages=[]"])
    with pytest.raises(ConfigError, match=r"<recipe>: stages: missing required key"):
        recipe_from_dict({"name": "x", "data": {"source": "synthetic"}})


def test_duplicate_stage_names_are_one_short_line(tmp_path):
    twice = RECIPE.replace("  - name: second", "  - name: first")
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, twice))
    assert str(info.value) == f"{tmp_path / 'recipe.yaml'}: stages: two stages are named 'first'"


def test_huge_override_key_and_value_are_truncated_in_errors(tmp_path):
    huge = "k" * 100_000
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, RECIPE), [huge + "=1"])
    assert str(info.value).endswith(": " + "k" * 60 + "...: unknown key")
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, RECIPE), ["stages.first.params.epochs=" + "9" * 50 + "x" * 100_000])
    assert len(str(info.value)) < 300 and "..." in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, RECIPE), [huge])  # no '=': the whole argument is echoed, truncated
    assert "k" * 60 + "..." in str(info.value) and len(str(info.value)) < 200


def test_shorten_truncates_and_escapes_user_input():
    from recalign.errors import quoted, shorten

    assert shorten("abc") == "abc" and shorten("x" * 60) == "x" * 60
    assert shorten("x" * 61) == "x" * 60 + "..." and shorten("y" * 100_000, 10) == "y" * 10 + "..."
    assert shorten("a\x00b\nc") == "a\\x00b\\nc"  # control characters stay visible and on one line
    assert quoted("z" * 70) == "'" + "z" * 60 + "...'"


def test_controllable_is_an_alias_of_reclmgen():
    """`kind: controllable` (RecLM-gen's first name here) still loads, as the reclmgen stage."""
    from recalign.methods import STAGE_KINDS, get_stage

    assert get_stage("controllable") is STAGE_KINDS["reclmgen"]
    raw = {"name": "alias", "data": {"source": "synthetic"}, "split": {"kind": "leave_one_out"},
           "stages": [{"name": "rl", "kind": "controllable", "params": {"teacher": "http://127.0.0.1:12621"}}]}
    recipe = recipe_from_dict(raw)
    assert recipe.stages[0].params["teacher"] == "http://127.0.0.1:12621"
    with pytest.raises(ConfigError, match="unknown stage kind 'reclmgenx'"):
        recipe_from_dict({**raw, "stages": [{**raw["stages"][0], "kind": "reclmgenx"}]})
