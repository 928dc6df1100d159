"""The explicit registry of recipe stage kinds, the seed rule and the stage dependency rule.

- `STAGE_KINDS`: kind -> "module:attribute" of a `Stage`, imported lazily.
- `fill_seeds`: the one seed rule: the recipe seed fills every seed a stage's params leave unset; explicit wins.
- `stage_dependencies`: the earlier stages each stage names (declared by its kind, never guessed from strings).
"""

from __future__ import annotations

import importlib
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from pydantic import BaseModel

from recalign.errors import ConfigError

if TYPE_CHECKING:
    from recalign.runs import RunContext

# What a stage's result may depend on at recipe level; its hash covers only the sections its kind reads.
RECIPE_SECTIONS = frozenset({"data", "split", "eval", "seed", "datasets"})
DEFAULT_READS = frozenset({"data", "split", "eval", "seed"})


def no_dependencies(params: BaseModel, stage_names: Sequence[str]) -> dict[str, str]:
    """A stage kind that never reads another stage's output."""
    return {}


@dataclass(frozen=True)
class Stage:
    """One kind of recipe stage: its params schema (extra keys forbidden) and the function that runs it.

    `run(ctx, params)` trains/evaluates, writes artifacts under `ctx.stage_dir`, and returns a flat
    metrics dict (floats, plus a few descriptive strings/ints) that ends up in the run's metrics.json.
    `depends_on(params, stage_names)` -> {params field: earlier stage name} for every stage whose output it reads.
    `reads`: the recipe sections (of RECIPE_SECTIONS) its result depends on; only they enter its config hash.
    """

    params: type[BaseModel]
    run: Callable[["RunContext", BaseModel], dict]
    description: str = ""
    depends_on: Callable[[BaseModel, Sequence[str]], dict[str, str]] = no_dependencies
    reads: frozenset[str] = DEFAULT_READS

    def __post_init__(self) -> None:
        unknown = set(self.reads) - RECIPE_SECTIONS
        if unknown:
            raise ValueError(f"Stage.reads: unknown recipe sections {sorted(unknown)}; known: {sorted(RECIPE_SECTIONS)}")


# kind -> "module:attribute". Heavy modules (transformers, peft) are imported only when a stage of that kind runs.
STAGE_KINDS: dict[str, str] = {
    "teacher": "recalign.teachers.stage:TEACHER_STAGE",
    "trd": "recalign.methods.trd:TRD_STAGE",
    "llm-sft": "recalign.llm.stage:LLM_SFT_STAGE",
    "sprec": "recalign.methods.sprec_report:SPREC_STAGE",
    "controllable": "recalign.methods.controllable_stage:CONTROLLABLE_STAGE",
    "trackrec": "recalign.methods.trackrec:TRACKREC_STAGE",
    "recgpt": "recalign.methods.recgpt:RECGPT_STAGE",
}


def get_stage(kind: str) -> Stage:
    """Resolve a stage kind to its Stage; unknown kinds are config errors naming the choices."""
    if kind not in STAGE_KINDS:
        raise ConfigError(f"unknown stage kind '{kind}'; choose one of: {', '.join(sorted(STAGE_KINDS))}")
    module, attribute = STAGE_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), attribute)


# ---- the seed rule ----------------------------------------------------------------------------------

def is_seed_field(name: str) -> bool:
    """Fields the recipe seed fills: `seed` and `*_seed` (e.g. `candidate_seed`)."""
    return name == "seed" or name.endswith("_seed")


def _takes_int(annotation: object) -> bool:
    if annotation is int:
        return True
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and int in typing.get_args(annotation)


def seed_fields(model: BaseModel, prefix: str = "") -> dict[str, int | None]:
    """Every seed field of a params model, nested models included: {dotted path: value}."""
    found: dict[str, int | None] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            found.update(seed_fields(value, f"{prefix}{name}."))
        elif is_seed_field(name) and _takes_int(info.annotation):
            found[prefix + name] = value
    return found


def fill_seeds(model: BaseModel, seed: int) -> BaseModel:
    """The one seed rule: every seed field the params left unset (not given, or null) becomes `seed`.

    Explicit values win. Nested settings models (e.g. `dqn`, `sft`, `generation`) are filled the same way, from
    the nearest explicit `seed` around them (a stage's own `seed: 5` seeds its `sft` too), else from `seed`.
    """
    own = getattr(model, "seed", None) if "seed" in model.model_fields_set else None
    inner = own if isinstance(own, int) else seed
    updates: dict[str, object] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            filled = fill_seeds(value, inner)
            if filled is not value:
                updates[name] = filled
        elif is_seed_field(name) and _takes_int(info.annotation) \
                and (name not in model.model_fields_set or value is None):
            updates[name] = seed
    return model.model_copy(update=updates) if updates else model


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
        declared = kind.depends_on(kind.params.model_validate(spec.params), names)
        for field_name, target in declared.items():
            where = f"stages.{spec.name}.params.{field_name}"
            if target not in names:
                raise ConfigError(f"{where}: no stage named '{target}'; stages: {', '.join(names)}")
            if names.index(target) >= position:
                raise ConfigError(f"{where}: stage '{target}' does not run before '{spec.name}' "
                                  "(a stage can only use the output of an earlier stage)")
        result[spec.name] = dict(declared)
    return result
