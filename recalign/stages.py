"""The explicit registry of recipe stage kinds: kind -> "module:attribute" of a `Stage`, imported lazily."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel

from recalign.errors import ConfigError

if TYPE_CHECKING:
    from recalign.runs import RunContext


@dataclass(frozen=True)
class Stage:
    """One kind of recipe stage: its params schema (extra keys forbidden) and the function that runs it.

    `run(ctx, params)` trains/evaluates, writes artifacts under `ctx.stage_dir`, and returns a flat
    metrics dict (floats, plus a few descriptive strings/ints) that ends up in the run's metrics.json.
    """

    params: type[BaseModel]
    run: Callable[["RunContext", BaseModel], dict]
    description: str = ""


# kind -> "module:attribute". Heavy modules (transformers, peft) are imported only when a stage of that kind runs.
STAGE_KINDS: dict[str, str] = {
    "teacher": "recalign.teachers.stage:TEACHER_STAGE",
    "trd": "recalign.methods.trd:TRD_STAGE",
    "llm-sft": "recalign.llm.stage:LLM_SFT_STAGE",
    "sprec": "recalign.methods.sprec_report:SPREC_STAGE",
}


def get_stage(kind: str) -> Stage:
    """Resolve a stage kind to its Stage; unknown kinds are config errors naming the choices."""
    if kind not in STAGE_KINDS:
        raise ConfigError(f"unknown stage kind '{kind}'; choose one of: {', '.join(sorted(STAGE_KINDS))}")
    module, attribute = STAGE_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), attribute)
