"""The recipe stage `reclmgen` (alias `controllable`): a thin adapter from a recipe to `run_controllable`
(`recalign.methods.reclmgen.algorithm`; docs/systems/reclmgen.md).

- `RECLMGEN_STAGE`: params (`RecLMGenStageConfig`), dependencies (the teacher stage, the init_from stage), the run in
  a persistent work folder under the run folder, flat metrics (the SeqRec row + `<task>/<metric>`).
- `AnsweredLists`: saved SeqRec answers as a list recommender, so `ctx.evaluate` scores them on the recipe's users
  next to the teachers (same users_hash, same keys).
- `stage_answers`: the per-task answers a finished stage saved under answers/.

The teacher baselines and paired comparisons are in `recalign.methods.reclmgen.baselines`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from recalign.errors import ConfigError, RecalignError
from recalign.eval.lists import NO_ENTRY, GeneratedLists
from recalign.io import read_json, write_atomic, write_json
from recalign.methods.reclmgen.algorithm import (
    fingerprint,
    run_controllable,
    seqrec_first,
)
from recalign.methods.reclmgen.answers import TaskAnswers, load_answers
from recalign.methods.reclmgen.baselines import control_table
from recalign.methods.reclmgen.config import RecLMGenConfig, RecLMGenStageConfig
from recalign.methods.reclmgen.tasks import TEST_TASKS
from recalign.stages import DONE, Stage, resolve_model_name

if TYPE_CHECKING:
    from recalign.stages import RunContext

__all__ = ["RecLMGenStageConfig", "RECLMGEN_STAGE", "AnsweredLists", "stage_answers", "run_stage"]

ANSWERS = "answers"
SFT_ADAPTER = "sft_adapter"


# ---- the SeqRec answers as a list recommender ------------------------------------------------------------------

class AnsweredLists:
    """Saved grounded answers of some users as a `ListRecommender` (`ctx.evaluate` scores them like any model)."""

    def __init__(self, answers: TaskAnswers):
        self.answers = answers
        self.position = {u: i for i, u in enumerate(answers.users)}

    def recommend(self, users, histories, k: int) -> GeneratedLists:
        """The first k grounded entries of each user's answer (NO_ENTRY past its end)."""
        missing = [int(u) for u in users if int(u) not in self.position]
        if missing:
            raise ConfigError(f"controllable: no saved answer for {len(missing)} evaluated user(s), e.g. {missing[0]}")
        index = torch.as_tensor([self.position[int(u)] for u in users], dtype=torch.long)
        grounded = self.answers.grounded_tensor()[index]
        if grounded.shape[1] < k:
            grounded = torch.cat([grounded, torch.full((len(index), k - grounded.shape[1]), NO_ENTRY,
                                                       dtype=torch.long)], 1)
        n_outputs = torch.as_tensor(self.answers.n_outputs, dtype=torch.long)[index]
        return GeneratedLists(grounded[:, :k], n_outputs)


def stage_answers(stage_dir: str | Path) -> dict[str, TaskAnswers]:
    """The per-task answers a finished controllable stage saved under answers/."""
    folder = Path(stage_dir) / ANSWERS
    if not folder.is_dir():
        raise ConfigError(f"{stage_dir}: no answers/ folder (not a finished controllable stage)")
    found = {a.task: a for a in (load_answers(p) for p in sorted(folder.glob("*.json")))}
    order = sorted(found, key=lambda t: (TEST_TASKS.index(t) if t in TEST_TASKS else len(TEST_TASKS), t))
    return {t: found[t] for t in seqrec_first(order)}


# ---- the stage -------------------------------------------------------------------------------------------------

def controllable_dependencies(params, stage_names: Sequence[str]) -> dict[str, str]:
    """The teacher stage (when `teacher` names one) and the init_from stage."""
    out = {}
    if params.teacher in stage_names:
        out["teacher"] = params.teacher
    if params.init_from is not None:
        out["init_from"] = params.init_from
    return out


def run_stage(ctx: "RunContext", params) -> dict:
    """Recipe stage "reclmgen" (alias "controllable"): SFT -> RL -> test tasks (resumable work folder), then metrics and answers."""
    from recalign.teachers.client import teacher_from_spec

    if ctx.split is None:
        raise ConfigError("a controllable stage needs a split (add `split:` to the recipe)")
    config, sft_adapter, init_hash = _starting_model(ctx, RecLMGenConfig(**params.model_dump()))
    try:
        teacher = teacher_from_spec(config.teacher, run_dir=ctx.run_dir)
    except RecalignError as exc:
        raise ConfigError(f"teacher: {exc}") from None
    users = ctx.eval_users("test")
    work = ctx.work_folder({"config": fingerprint(config), "init": init_hash, "data": ctx.dataset.fingerprint(),
                            "split": ctx.recipe.split.model_dump(mode="json"), "users": sorted(int(u) for u in users)},
                           "controllable")
    ctx.log(f"{config.model}: algorithm {config.algorithm}, teacher {config.teacher}, {len(users)} test users, "
            f"work folder {work}")
    out = run_controllable(config, ctx.dataset, ctx.split, teacher, work, users=users, sft_adapter=sft_adapter,
                           log=ctx.log, progress=ctx.progress)
    # The SeqRec row through the recipe's evaluator: comparable with every teacher row (same users, same keys).
    metrics = ctx.evaluate(AnsweredLists(out["tasks"]["seqrec"]), part="test")
    for task, values in out["metrics"].items():
        metrics.update({f"{task}/{name}": value for name, value in values.items() if isinstance(value, (int, float))})
    _write_outputs(ctx.stage_dir, out, sft_adapter)
    claims = rl_claims(ctx, config, out) if config.init_from is not None and config.algorithm != "none" else {}
    return {**_summary(config, out, work), **metrics, **claims}


# RecLM-gen's claims after RL against the SFT model it started from (paper §5.6): (task, metric, expected, words)
RL_CLAIMS = (("+c", "target_category_rate", "higher", "+C TargetCategoryRate up"),
             ("-c", "target_category_rate", "lower", "-C TargetCategoryRate down"),
             ("lp", "category_rate_correct", "higher", "LP CategoryRateCorrect up"),
             ("mp", "category_rate_correct", "higher", "MP CategoryRateCorrect up"),
             ("ep", "category_rate_correct", "higher", "EP CategoryRateCorrect up"),
             ("seqrec", "recall", "not_lower", "SeqRec Recall not significantly lower"))


def rl_claims(ctx: "RunContext", config: RecLMGenConfig, out: dict) -> dict:
    """{"claims": [...]}: this stage's test answers against its init_from stage's (the SFT model RL started from),
    paired bootstrap over the users both answered (`baselines.compare_tasks`)."""
    from recalign.eval.claims import measured_claim
    from recalign.methods.reclmgen.baselines import compare_tasks
    from recalign.methods.reclmgen.metrics import CategoryTable

    sft = stage_answers(ctx.stage_output(config.init_from))
    categories = CategoryTable.from_item_categories(ctx.dataset.item_categories())
    compared = compare_tasks(out["tasks"], sft, categories, n_resamples=1000, seed=ctx.seed)
    claims = []
    for prefix, metric, expect, words in RL_CLAIMS:
        for task, found in compared.items():
            if task.split("_")[0] != prefix or metric not in found:
                continue
            algorithm = config.algorithm.upper()
            claims.append(measured_claim(f"RecLM-gen ({algorithm})", f"{words} after {algorithm} against SFT",
                                         ctx.stage.name if ctx.stage else "reclmgen", config.init_from,
                                         f"{task}/{metric}", expect, found[metric]))
    return {"claims": claims}


RECLMGEN_KINDS = ("reclmgen", "controllable")  # the recipe kind and its older alias


def _starting_model(ctx: "RunContext", config: RecLMGenConfig) -> tuple[RecLMGenConfig, Path | None, str | None]:
    """(config with its model set, the init_from stage's SFT adapter or None, that stage's config hash or None)."""
    sft_adapter, init_hash = None, None
    if config.init_from is not None:
        folder = ctx.stage_output(config.init_from)
        other = read_json(folder / "metrics.json")
        if other.get("kind") not in RECLMGEN_KINDS or not (folder / SFT_ADAPTER).is_dir():
            raise ConfigError(f"init_from: stage '{config.init_from}' is not a reclmgen stage with an SFT model")
        other["model"] = resolve_model_name(other["model"], ctx.run_dir)  # a `stage:<name>` reference
        if config.model is not None and config.model != other["model"]:
            raise ConfigError(f"model: '{config.model}' differs from the init_from stage's model '{other['model']}'")
        config = config.model_copy(update={"model": other["model"]})
        sft_adapter = folder / SFT_ADAPTER
        init_hash = read_json(folder / DONE).get("config_hash")
    elif config.model is None:
        config = config.model_copy(update={"model": "smollm2"})
    return config, sft_adapter, init_hash


def _summary(config: RecLMGenConfig, out: dict, work: Path) -> dict:
    """The stage's descriptive keys: model, algorithm, reward, teacher, init_from, work_dir, SFT and RL records."""
    summary = {"model": config.model, "algorithm": config.algorithm, "reward": config.reward,
               "teacher": config.teacher, "init_from": config.init_from, "work_dir": str(work)}
    if out["sft"]:
        summary.update({f"sft_{k}": v for k, v in out["sft"][-1].items() if k in ("rows",)})
        summary["sft_loss_last"] = out["sft"][-1].get("sft_loss_last")
    rewards = [r.get("mean_reward", r.get("grpo_reward_last")) for r in out["rl"]]
    if rewards and rewards[0] is not None:
        summary.update({"rl_iterations": len(out["rl"]), "rl_reward_first": rewards[0], "rl_reward_last": rewards[-1]})
    return summary


def _write_outputs(stage_dir: Path, out: dict, sft_adapter: Path | None) -> None:
    """answers/<task>.json, control.md, training records, and the SFT adapter (for init_from stages)."""
    answers = stage_dir / ANSWERS
    answers.mkdir()
    for task, record in out["tasks"].items():
        write_atomic(answers / f"{task.replace('+', 'plus_').replace('-', 'minus_')}.json", record.model_dump_json())
    write_json(stage_dir / "control_metrics.json", out["metrics"])
    write_atomic(stage_dir / "control.md", control_table({out["rl_tag"]: out["metrics"]}))
    write_json(stage_dir / "training.json", {"sft": out["sft"], "rl": out["rl"]})
    if sft_adapter is None:
        shutil.copytree(out["sft_adapter"], stage_dir / SFT_ADAPTER)


RECLMGEN_STAGE = Stage(multi_process=True, params=RecLMGenStageConfig, run=run_stage,
                       depends_on=controllable_dependencies,
                       description="RecLM-gen: SFT on recommendation + control tasks from a teacher, then PPO or "
                                   "GRPO with per-item rewards; the test tasks' control metrics and the SeqRec row")
