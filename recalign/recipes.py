"""Loading a recipe: the schema check of `recalign.config`, then every stage's params against its kind in the
table of stage kinds (`recalign.methods.STAGE_KINDS`), the seed rule, and the stages' dependencies.

This is the one place where recipes meet methods, so `recalign.config` never imports a method.
"""

from __future__ import annotations

import os
import typing
from typing import Sequence

from pydantic import ValidationError

from recalign.config import (MOVED_TO_EVAL, Recipe, StageConfig, _describe, apply_overrides, parse_override, read_yaml,
                             validate_data_source)
from recalign.errors import ConfigError, RecalignError, quoted
from recalign.methods import KIND_ALIASES, STAGE_KINDS, get_stage
from recalign.stages import fill_seeds, model_reference

__all__ = ["load_recipe", "recipe_from_dict", "validate_stage_params", "stage_dependencies", "get_stage"]


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply `key=value` overrides and validate everything (stage params included)."""
    raw = read_yaml(path)
    return recipe_from_dict(apply_overrides(raw, overrides or []), source=str(path),
                            override_keys=[parse_override(o)[0] for o in overrides or []])


def recipe_from_dict(raw: dict, source: str = "<recipe>", override_keys: list[list[str]] | None = None) -> Recipe:
    """Validate a recipe mapping; errors name the full dotted key and where it came from."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, raw, source, override_keys or [])) from None
    validate_data_source(recipe.data, source=source, override_keys=override_keys or [])
    for role, specs in recipe.datasets.items():
        for i, spec in enumerate(specs):
            validate_data_source(spec, source=source, override_keys=override_keys or [],
                                 prefix=["datasets", role, str(i)])
    recipe.split = fill_seeds(recipe.split, recipe.seed)
    for stage in recipe.stages:
        stage.params = validate_stage_params(stage, source=source, override_keys=override_keys or [],
                                             seed=recipe.seed)
    try:
        stage_dependencies(recipe.stages)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return recipe


def validate_stage_params(stage: StageConfig, source: str = "<recipe>",
                          override_keys: list[list[str]] | None = None, seed: int | None = None) -> dict:
    """Check a stage's params against its kind's params model; returns the params with defaults filled in.

    With `seed` (the recipe's), every seed the params leave unset is filled with it (`recalign.stages.fill_seeds`).
    """
    if stage.kind not in STAGE_KINDS and stage.kind not in KIND_ALIASES:
        raise ConfigError(f"{source}: stages.{stage.name}.kind: unknown stage kind {quoted(stage.kind)}; "
                          f"choose one of: {', '.join(sorted(STAGE_KINDS))}")
    model = get_stage(stage.kind).params
    prefix = ["stages", stage.name, "params"]
    _check_moved_params(stage, source, override_keys or [])
    try:
        validated = model.model_validate(stage.params)
        params = (validated if seed is None else fill_seeds(validated, seed)).model_dump(mode="json")
        _check_nested_teacher(stage.kind, params)
    except RecalignError as exc:  # a lookup inside validation failed, e.g. an unknown teacher name
        raise ConfigError(f"{source}: stages.{stage.name}.params: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(_describe(exc, None, source, override_keys or [], prefix=prefix)) from None
    return params


def _check_moved_params(stage: StageConfig, source: str, override_keys: list[list[str]]) -> None:
    """A method stage that still sets `ks` or `eval_rows` is told where the setting lives now."""
    if stage.kind == "teacher":
        return
    for key, target in MOVED_TO_EVAL.items():
        if key in stage.params:
            loc = ["stages", stage.name, "params", key]
            origin = f"{source} (override)" if any(loc[:len(k)] == k for k in override_keys) else source
            raise ConfigError(f"{origin}: stages.{stage.name}.params.{key}: evaluation settings are recipe-wide "
                              f"now; set {target} instead (every stage is scored on the same users and cut-offs)")


def _check_nested_teacher(kind: str, params: dict) -> None:
    """A teacher stage carries the teacher's own settings (flat, or nested under `params`): check them against the
    teacher's Config now, so a misspelt key fails when the recipe is loaded, not after earlier stages trained."""
    if kind != "teacher" or not isinstance(params.get("model"), str):
        return
    from recalign.teachers.registry import get_teacher

    config = get_teacher(params["model"]).Config
    nested = params.get("params") or {}
    flat = {k: v for k, v in params.items() if k not in ("model", "params") and not (k == "seed" and v is None)}
    try:
        config.model_validate({**nested, **flat})
    except ValidationError as exc:
        def where(loc: tuple) -> tuple:  # report the key where the recipe wrote it
            return loc if loc and loc[0] in flat else ("params", *loc)

        errors = [{"type": e["type"], "loc": where(tuple(e["loc"])), "input": e.get("input"),
                   **({"ctx": e["ctx"]} if "ctx" in e else {})} for e in exc.errors()]
        raise ValidationError.from_exception_data(config.__name__, errors) from None


# ---- dependencies -----------------------------------------------------------------------------------

class _StageLike(typing.Protocol):
    name: str
    kind: str
    params: dict


def stage_dependencies(stages: Sequence[_StageLike]) -> dict[str, dict[str, str]]:
    """Per stage, {params field: earlier stage} as its kind declares; a later or unknown name is a ConfigError."""
    names = [stage.name for stage in stages]
    result: dict[str, dict[str, str]] = {}
    for position, spec in enumerate(stages):
        kind = get_stage(spec.kind)
        params = kind.params.model_validate(spec.params)
        declared = dict(kind.depends_on(params, names))
        if model_reference(params) is not None:  # `model: stage:<name>`: the model an earlier stage saved
            declared["model"] = model_reference(params)
        for field_name, target in declared.items():
            where = f"stages.{spec.name}.params.{field_name}"
            if target not in names:
                raise ConfigError(f"{where}: no stage named '{target}'; stages: {', '.join(names)}")
            if names.index(target) >= position:
                raise ConfigError(f"{where}: stage '{target}' does not run before '{spec.name}' "
                                  "(a stage can only use the output of an earlier stage)")
        result[spec.name] = dict(declared)
    return result
