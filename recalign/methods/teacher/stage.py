"""The "teacher" recipe stage: fit a classical teacher on the split's train part, save it, evaluate it on test."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recalign.errors import ConfigError
from recalign.stages import Stage, fill_seeds
from recalign.teachers.registry import get_teacher

if TYPE_CHECKING:
    from pathlib import Path

    from recalign.stages import RunContext


class TeacherStageConfig(BaseModel):
    """Params of a teacher stage: `model` plus the teacher's own settings, e.g. {model: sasrec, epochs: 30}.

    The settings may also be nested under `params` (the older form); keys given both ways take the flat value.
    Every key is checked against the teacher's Config when the recipe is loaded (`recalign.config`).
    """

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="teacher name: popularity | bprmf | sasrec")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the teacher's settings, nested (same as giving them flat)")
    seed: int | None = Field(None, description="the teacher's seed (default: the recipe seed)")

    @model_validator(mode="before")
    @classmethod
    def _lift_nested_seed(cls, value: Any) -> Any:
        """A seed given under `params` is the stage's seed (so the recipe seed does not replace it)."""
        if isinstance(value, dict) and value.get("seed") is None and isinstance(value.get("params"), dict) \
                and "seed" in value["params"]:
            nested = dict(value["params"])
            return {**value, "seed": nested.pop("seed"), "params": nested}
        return value

    def teacher_settings(self) -> dict[str, Any]:
        """The teacher's config overrides: nested `params` updated by the flat keys (and the seed when set)."""
        seed = {} if self.seed is None else {"seed": self.seed}
        return {**self.params, **(self.model_extra or {}), **seed}


def run_teacher_stage(ctx: "RunContext", params: TeacherStageConfig) -> dict:
    """Fit on split.train (early stopping on split.valid), save to <stage>/model, evaluate on split.test."""
    if ctx.split is None:
        raise ConfigError("a teacher stage needs a split (add `split:` to the recipe)")
    cls = get_teacher(params.model)
    overrides = fill_seeds(params, ctx.seed).teacher_settings()  # the one seed rule (a no-op for a loaded recipe)
    try:
        teacher = cls(**overrides)
    except ConfigError as exc:
        raise ConfigError(f"stage '{ctx.stage.name if ctx.stage else 'teacher'}': params: {exc}") from None
    split = ctx.split
    ctx.log(f"fit {params.model} on {len(split.train)} train interactions ({len(split.valid)} valid)")
    started = time.perf_counter()
    teacher.fit(ctx.dataset, split.train, split.valid if len(split.valid) else None, progress=ctx.progress,
                valid_history=split.history("valid"))
    train_seconds = time.perf_counter() - started
    teacher.save(ctx.stage_dir / "model")
    write_stage_curves(ctx.stage_dir, getattr(teacher, "curve_", None),
                       title=f"{params.model}: stage {ctx.stage.name if ctx.stage else params.model}")
    metrics = ctx.evaluate(teacher, part="test")
    extra = {"epochs_trained": getattr(teacher, "epochs_trained_", None),
             "best_epoch": getattr(teacher, "best_epoch_", None)}
    ctx.log(f"{params.model}: trained in {train_seconds:.1f}s")
    return {"teacher": params.model, **metrics, "train_seconds": round(train_seconds, 3),
            **{k: v for k, v in extra.items() if v is not None}}


def write_stage_curves(stage_dir: "Path", rows: list[dict] | None, title: str = "") -> None:
    """curves.jsonl and curves.png in the stage folder (beside model/) for a teacher trained over epochs."""
    if not rows:
        return
    from recalign.eval.curves import CURVES_FILE, CURVES_PNG, plot_curves, write_curves

    write_curves(rows, stage_dir / CURVES_FILE)
    plot_curves(rows, stage_dir / CURVES_PNG, title)


TEACHER_STAGE = Stage(params=TeacherStageConfig, run=run_teacher_stage,
                      description="fit a classical teacher (popularity, bprmf, sasrec), save it, evaluate on test")
