"""Stages name the stages they depend on (declared by their kind), and a stage's hash holds only what it reads."""

from __future__ import annotations

import pytest

from recalign.recipes import recipe_from_dict
from recalign.errors import ConfigError
from recalign.runs import stage_hashes
from recalign.recipes import stage_dependencies


def recipe(trd: dict | None = None, teacher_name: str = "bprmf", **extra):
    return recipe_from_dict({
        "name": "deps", "data": {"source": "synthetic"}, "split": {"kind": "global_temporal"}, **extra,
        "stages": [{"name": "pop", "kind": "teacher", "params": {"model": "popularity"}},
                   {"name": teacher_name, "kind": "teacher", "params": {"model": "bprmf", "epochs": 1}},
                   {"name": "trd", "kind": "trd", "params": trd or {}}]})


def test_trd_depends_on_the_teacher_stage_it_names_and_on_nothing_else():
    assert stage_dependencies(recipe().stages) == {"pop": {}, "bprmf": {}, "trd": {"teacher": "bprmf"}}
    assert stage_dependencies(recipe({"teacher": "pop"}).stages)["trd"] == {"teacher": "pop"}
    # a model name that is no stage: TRD trains it itself
    assert stage_dependencies(recipe(teacher_name="mf").stages)["trd"] == {}
    assert stage_dependencies(recipe({"teacher_source": "model"}).stages)["trd"] == {}
    # a param value that happens to equal a stage name is not a dependency (no string matching)
    assert stage_dependencies(recipe({"teacher_params": {"note": "pop"}}, teacher_name="mf").stages)["trd"] == {}


def test_an_unknown_or_later_stage_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"stages\.trd\.params\.teacher: no stage named 'sasrec'"):
        recipe({"teacher": "sasrec", "teacher_source": "stage"})
    with pytest.raises(ConfigError, match=r"stages\.trd\.params\.teacher: stage 'late' does not run before 'trd'"):
        recipe_from_dict({"name": "deps", "data": {"source": "synthetic"},
                          "stages": [{"name": "trd", "kind": "trd", "params": {"teacher": "late"}},
                                     {"name": "late", "kind": "teacher", "params": {"model": "bprmf"}}]})


def test_hash_follows_dependencies_only():
    base = stage_hashes(recipe(), "fp")
    teacher_changed = stage_hashes(recipe(trd=None, teacher_name="bprmf").model_copy(update={"stages": [
        *recipe().stages[:1],
        recipe().stages[1].model_copy(update={"params": {**recipe().stages[1].params, "epochs": 2}}),
        recipe().stages[2]]}), "fp")
    assert teacher_changed["bprmf"] != base["bprmf"] and teacher_changed["trd"] != base["trd"]
    assert teacher_changed["pop"] == base["pop"]
    on_pop = stage_hashes(recipe({"teacher": "pop"}), "fp")
    assert on_pop["bprmf"] == base["bprmf"] and on_pop["trd"] != base["trd"]


def test_hash_ignores_what_no_stage_reads():
    base = stage_hashes(recipe(), "fp")
    assert stage_hashes(recipe(eval={"table": ["hr@10"]}), "fp") == base  # report columns: never
    assert stage_hashes(recipe(description="another text"), "fp") == base
    assert stage_hashes(recipe(datasets={"pretrain": {"source": "synthetic"}}), "fp") == base  # nobody reads it
    assert set(stage_hashes(recipe(seed=1), "fp").values()).isdisjoint(base.values())  # every stage reads seed
    assert set(stage_hashes(recipe(), "other").values()).isdisjoint(base.values())
