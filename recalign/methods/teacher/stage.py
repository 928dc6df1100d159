"""The "teacher" recipe stage: fit a classical teacher on the split's train part, save it, evaluate it on test."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from recalign.errors import ConfigError
from recalign.methods.teacher.config import TeacherStageConfig
from recalign.stages import Stage, fill_seeds
from recalign.teachers.registry import get_teacher

if TYPE_CHECKING:
    from pathlib import Path

    from recalign.stages import RunContext


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
                      description="fit a classical teacher (popularity, bprmf, sasrec, itemknn, item2vec, neumf, ease), save it, evaluate on test")
