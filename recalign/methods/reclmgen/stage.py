"""The recipe stage `controllable` (RecLM-gen, `recalign.methods.reclmgen.algorithm`) and what reads its answers.

- `RECLMGEN_STAGE`: params (the method's config without the recipe-wide eval settings), dependencies (the
  teacher stage, the init_from stage), the run in a persistent work folder, flat metrics.
- `AnsweredLists`: saved SeqRec answers as a list recommender, so `ctx.evaluate` scores them on the recipe's users
  next to the teachers (same users_hash, same keys).
- `teacher_answers`: the teacher-with-category-filter baseline of every §5.6 task (+C: top-10 in C; -C: top-10
  outside C; LP/MP/EP: the top m in C and the top k - m outside C, in the teacher's order; ranking: its top-10 of
  the candidates).
- `compare_tasks`: paired bootstrap intervals of two systems' task metrics on the same users.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from recalign.checkpoints import stable_hash
from recalign.errors import ConfigError, RecalignError
from recalign.eval.lists import NO_ENTRY, GeneratedLists
from recalign.io import write_atomic, write_json
from recalign.methods.reclmgen.algorithm import (
    RecLMGenConfig,
    TaskAnswers,
    _ordered,
    _test_base,
    answer_records,
    fingerprint,
    load_answers,
    run_controllable,
    score_answers,
)
from recalign.methods.reclmgen.metrics import CategoryTable
from recalign.methods.reclmgen.tasks import TEST_TASKS, build_test_rows
from recalign.stages import Stage

if TYPE_CHECKING:
    from recalign.stages import RunContext

__all__ = ["RecLMGenStageConfig", "RECLMGEN_STAGE", "AnsweredLists", "teacher_answers", "compare_tasks",
           "stage_answers", "CONTROL_KEYS", "control_table"]

ANSWERS = "answers"
SFT_ADAPTER = "sft_adapter"
CONTROL_KEYS = ("recall", "mrr", "ndcg", "non_exist", "repeat", "in_history", "correct_count", "target_category_rate",
                "sr_target_category_rate", "category_rate_correct", "not_in_candidate")

class RecLMGenStageConfig(RecLMGenConfig):
    """Params of a `controllable` stage: the method's config (users and cut-offs: the recipe's eval section)."""


# ---- the SeqRec answers as a list recommender ----------------------------------------------------------------

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


# ---- the teacher with a category filter ----------------------------------------------------------------------

def teacher_answers(teacher, task: str, rows) -> TaskAnswers:
    """The teacher's answer to each test row, fulfilling its category request by filtering (see module doc)."""
    from recalign.methods.reclmgen.tasks import parse_test_task

    kind, _ = parse_test_task(task)
    n = len(rows)
    specs = rows.labels
    width = max([s.k for s in specs] + [1])
    if n == 0:
        return answer_records(task, rows, torch.zeros((0, 1), dtype=torch.long), torch.zeros(0, dtype=torch.long))
    histories = [[int(i) for i in h] for h in rows.histories]
    users = [int(u) for u in rows.users]
    if kind in ("+c", "-c"):
        lists = teacher.topk(histories, width, users=users, categories=[("+" if kind == "+c" else "-") + s.category
                                                                        for s in specs])
    elif kind in ("lp", "mp", "ep"):
        lists = _rate_lists(teacher, histories, users, specs, width)
    elif kind == "ranking":
        lists = teacher.topk(histories, width, users=users, candidates=[[int(i) for i in c] for c in rows.candidates])
    else:
        lists = teacher.topk(histories, width, users=users)
    lists = torch.as_tensor(lists, dtype=torch.long)
    k = torch.as_tensor([s.k for s in specs])
    cols = torch.arange(lists.shape[1])[None, :]
    grounded = torch.where((lists >= 0) & (cols < k[:, None]), lists, torch.full_like(lists, NO_ENTRY))
    return answer_records(task, rows, grounded, (grounded >= 0).sum(1))


def _rate_lists(teacher, histories: list[list[int]], users: list[int], specs, width: int) -> torch.Tensor:
    """Top m in C and top k - m outside C per row, merged in the teacher's rank order."""
    inside = torch.as_tensor(teacher.topk(histories, width, users=users, categories=["+" + s.category for s in specs]))
    outside = torch.as_tensor(teacher.topk(histories, width, users=users,
                                           categories=["-" + s.category for s in specs]))
    m = torch.as_tensor([s.m for s in specs])[:, None]
    k = torch.as_tensor([s.k for s in specs])[:, None]
    cols = torch.arange(width)[None, :]
    pool = torch.cat([torch.where(cols < m, inside, -1), torch.where(cols < k - m, outside, -1)], 1)
    ranks = torch.as_tensor(teacher.ranks(histories, pool.clamp(min=0).tolist(), users=users)).double()
    ranks = torch.where(pool >= 0, ranks, torch.full_like(ranks, float("inf")))
    order = torch.argsort(ranks, dim=1, stable=True)[:, :width]
    return pool.gather(1, order)


def teacher_baseline(teacher, dataset, split, users: np.ndarray | None, tasks: Sequence[str], seed: int,
                     max_history: int = 10, n_negatives: int = 100) -> dict[str, TaskAnswers]:
    """Every §5.6 task answered by the teacher with the category filter (its own SeqRec list feeds -C and LP)."""
    categories = CategoryTable.from_item_categories(dataset.item_categories())
    base = _test_base(dataset, split, max_history, users)
    out: dict[str, TaskAnswers] = {}
    for task in _ordered(list(tasks)):
        seqrec = out["seqrec"].grounded_tensor() if "seqrec" in out else None
        rows = build_test_rows(base, task, categories, seed, seqrec_lists=seqrec, teacher=teacher,
                               n_negatives=n_negatives)
        out[task] = teacher_answers(teacher, task, rows)
    return out


# ---- paired comparison -------------------------------------------------------------------------------------------

def compare_tasks(a: dict[str, TaskAnswers], b: dict[str, TaskAnswers], categories: CategoryTable,
                  n_resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per task: {metric: {a, b, diff, low, high}} (a - b, paired bootstrap over the users both answered)."""
    from recalign.eval.bootstrap import paired_bootstrap
    from recalign.methods.reclmgen.metrics import score_control

    out = {}
    for task in [t for t in a if t in b]:
        _, inputs_a = score_answers(a[task], categories, a.get("seqrec"))
        _, inputs_b = score_answers(b[task], categories, b.get("seqrec"))
        position_b = {u: i for i, u in enumerate(b[task].users)}
        pairs = [(i, position_b[u]) for i, u in enumerate(a[task].users) if u in position_b]
        if not pairs:
            continue
        ia, ib = (np.asarray(x, dtype=np.int64) for x in zip(*pairs))
        full = score_control(inputs_a.take(ia))
        keys = [k for k in CONTROL_KEYS if k in full and k in score_control(inputs_b.take(ib))]
        out[task] = paired_bootstrap(lambda index: score_control(inputs_a.take(ia[index])),
                                     lambda index: score_control(inputs_b.take(ib[index])), len(pairs), keys,
                                     n_resamples, seed=seed)
    return out


def control_table(rows: dict[str, dict[str, dict]], keys: Sequence[str] = CONTROL_KEYS) -> str:
    """Markdown: one row per (system, task), one column per §5.6 metric ('' where a task has none)."""
    lines = ["| system | task | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for system, tasks in rows.items():
        for task, metrics in tasks.items():
            cells = ["" if metrics.get(k) is None else f"{metrics[k]:.4f}" for k in keys]
            lines.append(f"| {system} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stage_answers(stage_dir: str | Path) -> dict[str, TaskAnswers]:
    """The per-task answers a finished controllable stage saved under answers/."""
    folder = Path(stage_dir) / ANSWERS
    if not folder.is_dir():
        raise ConfigError(f"{stage_dir}: no answers/ folder (not a finished controllable stage)")
    found = {a.task: a for a in (load_answers(p) for p in sorted(folder.glob("*.json")))}
    order = sorted(found, key=lambda t: (TEST_TASKS.index(t) if t in TEST_TASKS else len(TEST_TASKS), t))
    return {t: found[t] for t in _ordered(order)}


# ---- the stage ----------------------------------------------------------------------------------------------

def controllable_dependencies(params, stage_names: Sequence[str]) -> dict[str, str]:
    """The teacher stage (when `teacher` names one) and the init_from stage."""
    out = {}
    if params.teacher in stage_names:
        out["teacher"] = params.teacher
    if params.init_from is not None:
        out["init_from"] = params.init_from
    return out


def run_stage(ctx: "RunContext", params) -> dict:
    """Recipe stage "controllable": SFT -> RL -> test tasks (resumable work folder), then metrics and answers."""
    from recalign.teachers.client import teacher_from_spec

    if ctx.split is None:
        raise ConfigError("a controllable stage needs a split (add `split:` to the recipe)")
    config = RecLMGenConfig(**params.model_dump())
    sft_adapter, init_hash = None, None
    if config.init_from is not None:
        folder = ctx.stage_output(config.init_from)
        other = json.loads((folder / "metrics.json").read_text())
        if other.get("kind") != "controllable" or not (folder / SFT_ADAPTER).is_dir():
            raise ConfigError(f"init_from: stage '{config.init_from}' is not a controllable stage with an SFT model")
        if config.model is not None and config.model != other["model"]:
            raise ConfigError(f"model: '{config.model}' differs from the init_from stage's model '{other['model']}'")
        config = config.model_copy(update={"model": other["model"]})
        sft_adapter = folder / SFT_ADAPTER
        init_hash = json.loads((folder / "DONE").read_text()).get("config_hash")
    elif config.model is None:
        config = config.model_copy(update={"model": "smollm2"})
    try:
        teacher = teacher_from_spec(config.teacher, run_dir=ctx.run_dir)
    except RecalignError as exc:
        raise ConfigError(f"teacher: {exc}") from None
    users = ctx.eval_users("test")
    key = stable_hash({"config": fingerprint(config), "init": init_hash, "data": ctx.dataset.fingerprint(),
                       "split": ctx.recipe.split.model_dump(mode="json"), "users": sorted(int(u) for u in users)})
    work = ctx.run_dir / "work" / f"{ctx.stage.name if ctx.stage else 'controllable'}-{key}"
    ctx.log(f"{config.model}: algorithm {config.algorithm}, teacher {config.teacher}, {len(users)} test users, "
            f"work folder {work}")
    out = run_controllable(config, ctx.dataset, ctx.split, teacher, work, users=users, sft_adapter=sft_adapter,
                           log=ctx.log, progress=ctx.progress)
    # The SeqRec row through the recipe's evaluator: comparable with every teacher row (same users, same keys).
    metrics = ctx.evaluate(AnsweredLists(out["tasks"]["seqrec"]), part="test")
    for task, values in out["metrics"].items():
        metrics.update({f"{task}/{name}": value for name, value in values.items() if isinstance(value, (int, float))})
    _write_outputs(ctx.stage_dir, out, sft_adapter)
    summary = {"model": config.model, "algorithm": config.algorithm, "reward": config.reward,
               "teacher": config.teacher, "init_from": config.init_from, "work_dir": str(work)}
    if out["sft"]:
        summary.update({f"sft_{k}": v for k, v in out["sft"][-1].items() if k in ("rows",)})
        summary["sft_loss_last"] = out["sft"][-1].get("sft_loss_last")
    rewards = [r.get("mean_reward", r.get("grpo_reward_last")) for r in out["rl"]]
    if rewards and rewards[0] is not None:
        summary.update({"rl_iterations": len(out["rl"]), "rl_reward_first": rewards[0], "rl_reward_last": rewards[-1]})
    return {**summary, **metrics}


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


RECLMGEN_STAGE = Stage(multi_process=True, params=RecLMGenStageConfig, run=run_stage, depends_on=controllable_dependencies,
                           description="RecLM-gen: SFT on recommendation + control tasks from a teacher, then PPO or "
                                       "GRPO with per-item rewards; §5.6 control metrics and the SeqRec row")
