"""TRD's recipe stage, a thin adapter: RunContext -> the algorithm (`recalign.methods.trd.algorithm`) -> metrics and
artifacts. Protocol `recipe` (default: `fit_on_validation`, leave-one-out or any recipe split, scored by the
recipe's evaluator) and `trd_temporal` (the paper's: `run_trd`); the student is saved beside its metrics.
The protocols: docs/protocols.md; the method: docs/systems/trd.md."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import torch
from pydantic import BaseModel

from recalign.errors import ConfigError
from recalign.io import write_json
from recalign.methods.trd.algorithm import (
    TRDResult,
    fit_on_validation,
    run_trd,
    train_teacher,
)
from recalign.methods.trd.config import TRDConfig, TRDStageConfig
from recalign.methods.trd.dqn import DQNReranker
from recalign.stages import Stage
from recalign.threads import torch_threads

if TYPE_CHECKING:
    from recalign.data.split import Split
    from recalign.stages import RunContext
    from recalign.teachers.base import Recommender


# ---- the recipe stage ---------------------------------------------------------------------------------

def run_stage(ctx: "RunContext", params: BaseModel) -> dict:
    """The `trd` stage: the recipe protocol by default, the paper's `trd_temporal` when asked for by name."""
    values = params.model_dump(exclude={"protocol"})
    config = TRDConfig(**values, ks=list(ctx.recipe.eval.ks))
    if getattr(params, "protocol", "recipe") == "trd_temporal":
        return run_temporal_stage(ctx, config)
    return run_recipe_stage(ctx, config)


def teacher_dependency(config: TRDConfig, stage_names: Sequence[str]) -> dict[str, str]:
    """The stage TRD depends on: `teacher` when it names a recipe stage (or `teacher_source: stage`)."""
    if config.teacher_source == "stage" or (config.teacher_source == "auto" and config.teacher in stage_names):
        return {"teacher": config.teacher}
    return {}


def teacher_is_stage(ctx: "RunContext", config: TRDConfig) -> bool:
    """Whether `teacher` names an earlier stage (else a model to train here)."""
    is_stage = config.teacher in {stage.name for stage in ctx.recipe.stages}
    if config.teacher_source == "stage" and not is_stage:
        raise ConfigError(f"trd stage: no stage named '{config.teacher}' (teacher_source: stage)")
    return is_stage if config.teacher_source == "auto" else config.teacher_source == "stage"


def stage_split(ctx: "RunContext", config: TRDConfig) -> tuple["Split", bool]:
    """The recipe's split when it is global temporal; otherwise the stage's own one (returns split, own?)."""
    if ctx.split is not None and "train2" in ctx.split.extra:
        return ctx.split, False
    if teacher_is_stage(ctx, config):
        kind = ctx.recipe.split.kind
        raise ConfigError(f"trd stage: teacher stage '{config.teacher}' was trained on the recipe's {kind} split, "
                          f"which overlaps TRD's temporal test part; use split.kind: global_temporal, or set "
                          f"teacher_source: model so TRD trains teacher '{config.teacher}' on its own train1")
    from recalign.data.split import global_temporal_split

    ctx.log(f"recipe split is {ctx.recipe.split.kind}: TRD uses its own global temporal split {config.fractions}")
    return global_temporal_split(ctx.dataset, fractions=tuple(config.fractions)), True


def resolve_teacher(ctx: "RunContext", split: "Split", config: TRDConfig) -> tuple["Recommender", float]:
    """An earlier stage's teacher, or a teacher model trained here on train1; returns (teacher, train seconds)."""
    if teacher_is_stage(ctx, config):
        return ctx.load_teacher(config.teacher), 0.0
    started = time.perf_counter()
    params = {"threads": config.threads, **config.teacher_params}
    teacher = train_teacher(config.teacher, ctx.dataset, split, params, ctx.seed, ctx.progress)
    return teacher, time.perf_counter() - started


# ---- protocol "trd_temporal" (the paper's) --------------------------------------------------------------------

def run_temporal_stage(ctx: "RunContext", config: TRDConfig) -> dict:
    """Protocol `trd_temporal` (the paper's): teacher -> pools -> student on train2 -> select on valid -> test."""
    split, own_split = stage_split(ctx, config)
    with torch_threads(config.threads):
        teacher, teacher_seconds = resolve_teacher(ctx, split, config)
    result = run_trd(ctx.dataset, split, teacher, config, seed=ctx.seed, progress=ctx.progress, log=ctx.log)
    _save_temporal(ctx, result, teacher, config)
    gain = _relative_gain(result.student_test.get("ndcg@10"), result.teacher_test.get("ndcg@10"))
    ctx.log(f"test ndcg@10 teacher {result.teacher_test.get('ndcg@10', float('nan')):.4f} "
            f"trd {result.student_test.get('ndcg@10', float('nan')):.4f}")
    return {
        "model": f"trd({getattr(teacher, 'name', config.teacher)})",
        "protocol": "trd_temporal", "parity": config.parity, "cand_num": config.cand_num,
        "split": "own global_temporal " + str(config.fractions) if own_split else "recipe global_temporal",
        "candidate_seed": ctx.seed if config.candidate_seed is None else config.candidate_seed,
        "oracle_test_transitions": config.oracle_test_transitions,
        "best_epoch": result.student.best_epoch_, **result.counts,
        **result.student_test,
        **{f"teacher.{k}": v for k, v in result.teacher_test.items()},
        **{f"valid.{k}": v for k, v in result.student_valid.items()},
        **{f"teacher.valid.{k}": v for k, v in result.teacher_valid.items()},
        "ndcg@10_relative_gain": gain,
        "teacher_train_seconds": round(teacher_seconds, 3),
        "train_seconds": round(result.seconds["student_train"], 3),
    }


def _save_temporal(ctx: "RunContext", result: TRDResult, teacher: "Recommender", config: TRDConfig) -> None:
    """student.pt, test_lists.pt, training.json and the student's (and any teacher's) curves in the stage folder."""
    torch.save(result.student.state_dict(), ctx.stage_dir / "student.pt")
    torch.save({"users": result.test_users, "teacher": result.teacher_test_lists,
                "student": result.student_test_lists}, ctx.stage_dir / "test_lists.pt")
    write_json(ctx.stage_dir / "training.json", {"epochs": result.student.history_,
                                                 "best_epoch": result.student.best_epoch_})
    from recalign.eval.curves import CURVES_FILE, CURVES_PNG, plot_curves, write_curves

    write_curves(result.student.curve_, ctx.stage_dir / CURVES_FILE)  # the DQN student's epochs
    stage_name = getattr(ctx.stage, "name", "trd")
    plot_curves(result.student.curve_, ctx.stage_dir / CURVES_PNG, f"TRD student (DQN): stage {stage_name}")
    teacher_curve = getattr(teacher, "curve_", None)
    if teacher_curve:  # a teacher trained by this stage on train1
        write_curves(teacher_curve, ctx.stage_dir / "teacher" / CURVES_FILE)
        plot_curves(teacher_curve, ctx.stage_dir / "teacher" / CURVES_PNG, f"TRD teacher ({config.teacher})")


def _relative_gain(new: float | None, old: float | None) -> float | None:
    """(new - old) / old; None when either is missing or old is 0."""
    if new is None or old is None or old == 0:
        return None
    return (new - old) / old


# ---- protocol "recipe" (the default): re-rank the teacher's list for the recipe's split ------------------------

def run_recipe_stage(ctx: "RunContext", config: TRDConfig) -> dict:
    """Protocol `recipe`: the student learns on validation episodes (90% of users, seeded), picks its epoch on the
    other 10%, then re-ranks the test users' lists; scored by `ctx.evaluate` like every other stage."""
    if ctx.split is None:
        raise ConfigError("the trd stage needs a split")
    if config.parity != "standard" or config.oracle_test_transitions:
        raise ConfigError("trd: parity: daisy and oracle_test_transitions belong to protocol: trd_temporal")
    with torch_threads(config.threads):
        teacher, teacher_seconds = resolve_teacher(ctx, ctx.split, config)
        student, lists, counts, seconds = fit_on_validation(ctx.dataset, ctx.split, teacher, config, ctx.seed,
                                                            ctx.progress, ctx.log)
        started = time.perf_counter()
        metrics = ctx.evaluate(lists, part="test")
        seconds["student_rerank"] = time.perf_counter() - started
        teacher_metrics = ctx.evaluate(teacher, part="test", label="teacher")
    _save_student(ctx, student, teacher, config)
    gain = _relative_gain(metrics.get("ndcg@10"), teacher_metrics.get("ndcg@10"))
    ctx.log(f"test ndcg@10 teacher {teacher_metrics.get('ndcg@10', float('nan')):.4f} "
            f"trd {metrics.get('ndcg@10', float('nan')):.4f}")
    return {"model": f"trd({getattr(teacher, 'name', config.teacher)})", "cand_num": config.cand_num,
            "best_epoch": student.best_epoch_, **counts, **metrics,
            **{f"teacher.{k}": v for k, v in teacher_metrics.items() if isinstance(v, (int, float))},
            "ndcg@10_relative_gain": gain, "teacher_train_seconds": round(teacher_seconds, 3),
            "train_seconds": round(seconds["student_train"], 3)}


def _save_student(ctx: "RunContext", student: DQNReranker, teacher: "Recommender", config: TRDConfig) -> None:
    """student.pt, training.json and the student's (and a locally trained teacher's) curves in the stage folder."""
    from recalign.eval.curves import CURVES_FILE, CURVES_PNG, plot_curves, write_curves

    torch.save(student.state_dict(), ctx.stage_dir / "student.pt")
    write_json(ctx.stage_dir / "training.json", {"epochs": student.history_, "best_epoch": student.best_epoch_})
    write_curves(student.curve_, ctx.stage_dir / CURVES_FILE)
    plot_curves(student.curve_, ctx.stage_dir / CURVES_PNG, f"TRD student (DQN): stage {getattr(ctx.stage, 'name', 'trd')}")
    teacher_curve = getattr(teacher, "curve_", None)
    if teacher_curve and not teacher_is_stage(ctx, config):
        write_curves(teacher_curve, ctx.stage_dir / "teacher" / CURVES_FILE)
        plot_curves(teacher_curve, ctx.stage_dir / "teacher" / CURVES_PNG, f"TRD teacher ({config.teacher})")


TRD_STAGE = Stage(params=TRDStageConfig, run=run_stage, depends_on=teacher_dependency,
                  description="TRD: a DQN student re-ranks the top of a teacher's list (the recipe's split by default; "
                              "protocol trd_temporal: the paper's global temporal split)")
