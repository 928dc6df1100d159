"""Baselines and comparisons beside the LLM's answers (RecLM-gen, docs/systems/reclmgen.md "How it is evaluated").

- `teacher_answers` / `teacher_baseline`: the teacher-with-category-filter baseline of every test task (+C: top-10 in
  C; -C: top-10 outside C; LP/MP/EP: the top m in C and the top k - m outside C, in the teacher's order; ranking:
  its top-10 of the candidates), as `TaskAnswers` like the model's.
- `compare_tasks`: paired bootstrap intervals of two systems' task metrics on the same users.
- `control_table`: the control metrics of several systems as one Markdown table.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from recalign.eval.lists import NO_ENTRY
from recalign.methods.reclmgen.algorithm import (
    evaluated_rows,
    score_answers,
    seqrec_first,
)
from recalign.methods.reclmgen.answers import TaskAnswers, answer_records
from recalign.methods.reclmgen.metrics import CONTROL_KEYS, CategoryTable, score_control
from recalign.methods.reclmgen.tasks import build_test_rows, parse_test_task

__all__ = ["teacher_answers", "teacher_baseline", "compare_tasks", "control_table"]


# ---- the teacher with a category filter ------------------------------------------------------------------------

def teacher_answers(teacher, task: str, rows) -> TaskAnswers:
    """The teacher's answer to each test row, fulfilling its category request by filtering (see module doc)."""
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
    """Every test task answered by the teacher with the category filter (its own SeqRec list feeds -C and LP)."""
    categories = CategoryTable.from_item_categories(dataset.item_categories())
    base = evaluated_rows(dataset, split, max_history, users)
    out: dict[str, TaskAnswers] = {}
    for task in seqrec_first(list(tasks)):
        seqrec = out["seqrec"].grounded_tensor() if "seqrec" in out else None
        rows = build_test_rows(base, task, categories, seed, seqrec_lists=seqrec, teacher=teacher,
                               n_negatives=n_negatives)
        out[task] = teacher_answers(teacher, task, rows)
    return out


# ---- paired comparison -----------------------------------------------------------------------------------------

def compare_tasks(a: dict[str, TaskAnswers], b: dict[str, TaskAnswers], categories: CategoryTable,
                  n_resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per task: {metric: {a, b, diff, low, high}} (a - b, paired bootstrap over the users both answered)."""
    from recalign.eval.bootstrap import paired_bootstrap

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
    """Markdown: one row per (system, task), one column per control metric ('' where a task has none)."""
    lines = ["| system | task | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for system, tasks in rows.items():
        for task, metrics in tasks.items():
            cells = ["" if metrics.get(k) is None else f"{metrics[k]:.4f}" for k in keys]
            lines.append(f"| {system} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
