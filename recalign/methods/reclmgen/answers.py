"""One test task's saved answers (`TaskAnswers`): the rows' requests, the raw answers and their grounded titles.

What `recalign.methods.reclmgen.algorithm` writes per test task (and `score_answers` reads), what the teacher
baselines produce (`recalign.methods.reclmgen.baselines`) and what a finished stage keeps under answers/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from recalign.eval.lists import NO_ENTRY
from recalign.io import read_json
from recalign.llm.tasks import Rows
from recalign.methods.reclmgen.tasks import ControlRequest, parse_test_task

__all__ = ["TaskAnswers", "test_rows_of", "answer_records", "load_answers"]


class TaskAnswers(BaseModel):
    """One test task's rows and answers: the request of each row, the raw answer and its grounded titles."""

    task: str
    users: list[int]
    targets: list[int]
    histories: list[list[int]]
    k: list[int]
    category: list[str | None]                  # the row's C (unsigned), or None
    rule: list[str | None]                      # LP / MP / EP, or None
    m: list[int]                                # target count in C of category-rate rows (0 otherwise)
    candidates: list[list[int]] | None = None   # SeqRanking
    answers: list[str] | None = None            # raw generated text (None for a teacher baseline)
    grounded: list[list[int]]                   # grounded entries, -1 = not in the catalog, -2 = no entry
    n_outputs: list[int]                        # titles before truncation (CorrectCount)
    seconds: float | None = None                # generation wall time of the answers (cost measurements)
    cpu_seconds: float | None = None            # ... and its process CPU time (all threads; load-independent)

    def grounded_tensor(self) -> torch.Tensor:
        """[rows, max(k)] grounded entries, padded with NO_ENTRY."""
        width = max([len(g) for g in self.grounded] + list(self.k) + [1])
        out = torch.full((len(self.grounded), width), NO_ENTRY, dtype=torch.long)
        for row, items in enumerate(self.grounded):  # filling a padded tensor
            out[row, : len(items)] = torch.as_tensor(items, dtype=torch.long)
        return out


def test_rows_of(answers: TaskAnswers) -> Rows:
    """The rows a `TaskAnswers` was made from (requests as `ControlRequest` labels), for `metric_inputs`."""
    kind, p = parse_test_task(answers.task)
    specs = [ControlRequest(kind, k, c, p=p, m=m if r else None) for k, c, m, r in
             zip(answers.k, answers.category, answers.m, answers.rule)]
    return Rows(np.asarray(answers.users, dtype=np.int64), answers.histories,
                np.asarray(answers.targets, dtype=np.int64), None, answers.candidates, None, specs)


def answer_records(task: str, rows: Rows, grounded: torch.Tensor, n_outputs: torch.Tensor,
                   answers: list[str] | None = None) -> TaskAnswers:
    """A `TaskAnswers` of test rows (labels = ControlRequest) with grounded entries [rows, W] and title counts."""
    specs = rows.labels
    return TaskAnswers(task=task, users=rows.users.tolist(), targets=rows.targets.tolist(),
                       histories=[[int(i) for i in h] for h in rows.histories], k=[s.k for s in specs],
                       category=[s.category for s in specs], rule=[s.rule for s in specs],
                       m=[s.m or 0 for s in specs],
                       candidates=None if rows.candidates is None or any(c is None for c in rows.candidates)
                       else [[int(i) for i in c] for c in rows.candidates],
                       answers=answers, grounded=grounded.tolist(), n_outputs=n_outputs.tolist())


def load_answers(path: str | Path) -> TaskAnswers:
    """A saved `TaskAnswers` JSON file."""
    return TaskAnswers.model_validate(read_json(path))
