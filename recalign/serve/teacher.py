"""The RecLM-gen teacher over HTTP: POST /inference, POST /ranking, GET /health.

The JSON shapes are the original's, but every row is served, unknown ids are 4xx answers, history exclusion is an
explicit flag, `/ranking` works batched and immediate, and answers equal `TeacherService` in process.
Rows of an /inference answer hold at most k items (fewer when fewer are eligible); /ranking rows match their
candidate lists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from recalign.errors import ConfigError
from recalign.serve.app import (DEFAULT_MAX_ROWS, DEFAULT_MAX_WAIT_MS, TOKEN_ENV, MicroBatcher, bearer_auth,
                                create_app, serve, server_token)
from recalign.teachers.service import DEFAULT_MAX_HISTORY, TeacherService

DEFAULT_PORT = 12621  # the original server's port
ItemId = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]  # int64: a larger number is a 422, not a 500
ItemList = list[ItemId]


class _Rows(BaseModel):
    """Fields shared by both endpoints: one row per history."""

    model_config = ConfigDict(extra="forbid")
    users: list[StrictInt] | None = Field(None, description="user ids, one per row (needed by BPR-MF teachers)")
    item_lengths: list[StrictInt] | None = Field(None, description="len(item_lists[i]) (optional, checked)")
    item_lists: Annotated[list[ItemList], Field(min_length=1, max_length=DEFAULT_MAX_ROWS)] = Field(
        description="each row's history, oldest first")
    immediately: Literal[0, 1] | StrictBool = Field(0, description="1: skip micro-batching")
    candidate_item_lists: list[ItemList | None] | None = Field(None, description="candidates per row (null: all)")

    @model_validator(mode="after")
    def _same_rows(self) -> "_Rows":
        rows = len(self.item_lists)
        for name in ("users", "item_lengths", "candidate_item_lists", "target_category"):
            values = getattr(self, name, None)
            if values is not None and len(values) != rows:
                raise ValueError(f"{name} has {len(values)} rows but item_lists has {rows}")
        if self.item_lengths is not None:
            for row, (length, items) in enumerate(zip(self.item_lengths, self.item_lists)):
                if length != len(items):
                    raise ValueError(f"item_lengths[{row}] is {length} but item_lists[{row}] has {len(items)} items")
        return self


class InferenceBody(_Rows):
    """POST /inference: top-k per row over candidates, "+C"/"-C", or all items (minus history by default)."""

    k: StrictInt = Field(ge=1, le=10000)
    target_category: list[str | None] | None = Field(None, description='"+C", "-C" or null per row')
    exclude_history: StrictBool = Field(True, description="never return an item of the row's history")


class RankingBody(_Rows):
    """POST /ranking: 0-based rank of each candidate among all items (history not excluded)."""

    candidate_item_lists: list[ItemList] = Field(description="the items to rank, per row")
    k: StrictInt | None = Field(None, description="accepted for the original client's shape; unused")


class InferenceAnswer(BaseModel):
    """The /inference answer (documented in OpenAPI, not validated per request)."""

    inference: list[list[int]] = Field(description="top-k item ids per row, best first")


class RankingAnswer(BaseModel):
    """The /ranking answer (documented in OpenAPI, not validated per request)."""

    ranking: list[list[int]] = Field(description="0-based rank of each candidate among all items, per row")


@dataclass(frozen=True)
class TeacherJob:
    """One request as the model thread sees it."""

    kind: Literal["inference", "ranking"]
    histories: list[list[int]]
    users: list[int] | None
    candidates: list[list[int]] | None
    categories: list[str | None] | None = None
    k: int = 0
    exclude_history: bool = True

    @property
    def rows(self) -> int:
        return len(self.histories)


def job_from(body: InferenceBody | RankingBody) -> TeacherJob:
    """The TeacherJob of a validated body."""
    if isinstance(body, InferenceBody):
        return TeacherJob("inference", body.item_lists, body.users, body.candidate_item_lists, body.target_category,
                          body.k, body.exclude_history)
    return TeacherJob("ranking", body.item_lists, body.users, body.candidate_item_lists)


def run_jobs(service: TeacherService, jobs: list[TeacherJob]) -> list[list[list[int]]]:
    """Answer a batch of jobs with one service call per kind (and history flag); rows keep their job's order."""
    answers: list[list[list[int]] | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault((job.kind, job.exclude_history), []).append(index)
    for (kind, exclude), members in groups.items():
        group = [jobs[i] for i in members]
        histories = [h for job in group for h in job.histories]
        users = [u for job in group for u in job.users] if all(job.users is not None for job in group) else None
        candidates = [c for job in group for c in (job.candidates or [None] * job.rows)]
        if kind == "ranking":
            table = service.ranks(histories, candidates, users=users).tolist()
            rows = [row[:len(cand)] for row, cand in zip(table, candidates)]
        else:
            categories = [c for job in group for c in (job.categories or [None] * job.rows)]
            any_candidates = any(job.candidates is not None for job in group)
            table = service.topk(histories, max(job.k for job in group), users=users,
                                 candidates=candidates if any_candidates else None,
                                 categories=categories if any(categories) else None, exclude_history=exclude)
            rows = [[item for item in row if item >= 0] for row in table.tolist()]
        start = 0
        for index, job in zip(members, group):
            part = rows[start:start + job.rows]
            answers[index] = [row[:job.k] for row in part] if kind == "inference" else part
            start += job.rows
    return answers


def check_job(service: TeacherService, job: TeacherJob) -> None:
    """Raise RequestError for unknown ids or categories before the job joins a batch."""
    service.check(job.histories, users=job.users, candidates=job.candidates, categories=job.categories)


def create_teacher_app(service: TeacherService, *, token: str | None = None, batching: bool = True,
                       max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_rows: int = DEFAULT_MAX_ROWS) -> FastAPI:
    """The teacher app around `service`; `token` (None: no auth) guards /inference and /ranking."""
    app = create_app("recalign teacher", f"{service.name} teacher over {service.n_items} items (RecLM-gen API)")
    batcher: MicroBatcher[TeacherJob, list[list[int]]] = MicroBatcher(
        lambda jobs: run_jobs(service, jobs), rows=lambda job: job.rows, max_wait_ms=max_wait_ms, max_rows=max_rows)
    app.state.batcher = batcher
    auth = [Depends(bearer_auth(token))]

    async def answer(body: InferenceBody | RankingBody) -> list[list[int]]:
        job = job_from(body)
        check_job(service, job)
        if batching and not body.immediately:
            return await batcher.submit(job)
        return await batcher.run_now(job)

    # JSONResponse directly: plain int lists need no response-model validation (a measurable cost per request)
    @app.post("/inference", dependencies=auth, response_model=None, responses={200: {"model": InferenceAnswer}})
    async def inference(body: InferenceBody) -> JSONResponse:
        """Top-k items per row."""
        return JSONResponse({"inference": await answer(body)})

    @app.post("/ranking", dependencies=auth, response_model=None, responses={200: {"model": RankingAnswer}})
    async def ranking(body: RankingBody) -> JSONResponse:
        """Rank of each candidate among all items, per row."""
        return JSONResponse({"ranking": await answer(body)})

    @app.get("/health")
    async def health() -> dict:
        """Liveness and what is served (no auth needed)."""
        return {"status": "ok", "teacher": service.name, "n_items": service.n_items,
                "max_history": service.max_history, "batching": batching,
                "batches": batcher.batches, "batched_requests": batcher.jobs}

    return app


def serve_teacher(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                  batching: bool = True, max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_rows: int = DEFAULT_MAX_ROWS,
                  max_history: int | None = DEFAULT_MAX_HISTORY, log_level: str = "warning") -> None:
    """Load the teacher stage `folder` and serve it until interrupted ($RECALIGN_TOKEN required off loopback)."""
    token = server_token(host, TOKEN_ENV)  # before loading anything: a refused bind costs nothing
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {port}")
    service = TeacherService.from_stage(folder, max_history=max_history)
    app = create_teacher_app(service, token=token, batching=batching, max_wait_ms=max_wait_ms, max_rows=max_rows)
    serve(app, host, port, log_level)
