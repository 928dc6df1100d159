"""A teacher reached over HTTP with the same `topk` / `ranks` as the in-process `TeacherService`.

`teacher_from_spec` turns a recipe's `teacher:` value into one or the other: "http://host:port" gives a
`TeacherClient`, a stage name or folder gives a `TeacherService`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from recalign.errors import RecalignError, RequestError, shorten
from recalign.teachers.service import DEFAULT_MAX_HISTORY, TeacherService, pad_lists

TOKEN_ENV = "RECALIGN_TOKEN"  # the same variable the servers read (recalign.serve.app.TOKEN_ENV)


class TeacherClient:
    """Calls a `recalign serve teacher` server (or the original RecLM-gen API) for whole batches."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 120.0, immediately: bool = True,
                 max_history: int | None = DEFAULT_MAX_HISTORY):
        import httpx

        self.url = url.rstrip("/")
        self.max_history = max_history
        self.immediately = immediately  # a client call is already a batch; let the server micro-batch if False
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def topk(self, histories: list[list[int]], k: int, *, users: list[int] | None = None,
             candidates: list[list[int] | None] | None = None, categories: list[str | None] | None = None,
             exclude_history: bool = True) -> torch.Tensor:
        """Top-k item ids per row, LongTensor [B, k] padded with -1 (as TeacherService.topk)."""
        body = self._rows(histories, users)
        body.update(k=k, exclude_history=exclude_history)
        if candidates is not None:
            body["candidate_item_lists"] = [None if c is None else list(c) for c in candidates]
        if categories is not None:
            body["target_category"] = list(categories)
        return pad_lists(self._post("/inference", body)["inference"], k)

    def ranks(self, histories: list[list[int]], candidates: list[list[int]], users: list[int] | None = None
              ) -> torch.Tensor:
        """Rank of each candidate among all items, LongTensor [B, C] padded with -1 (as TeacherService.ranks)."""
        body = self._rows(histories, users)
        body["candidate_item_lists"] = [list(c) for c in candidates]
        rows = self._post("/ranking", body)["ranking"]
        return pad_lists(rows, max((len(c) for c in candidates), default=0))

    def health(self) -> dict:
        """The server's /health answer."""
        return self._get("/health")

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rows(self, histories: list[list[int]], users: list[int] | None) -> dict:
        kept = [list(h) if self.max_history is None else list(h)[-self.max_history:] for h in histories]
        body: dict = {"item_lists": kept, "item_lengths": [len(h) for h in kept],
                      "immediately": int(self.immediately)}
        if users is not None:
            body["users"] = [int(u) for u in users]
        return body

    def _post(self, path: str, body: dict) -> dict:
        return self._answer(lambda: self._http.post(path, json=body), path)

    def _get(self, path: str) -> dict:
        return self._answer(lambda: self._http.get(path), path)

    def _answer(self, send, path: str) -> dict:
        import httpx

        try:
            response = send()
        except httpx.HTTPError as exc:
            raise RecalignError(f"teacher server {self.url} unreachable ({type(exc).__name__}: {shorten(exc, 200)})"
                                ) from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            error = RequestError if response.status_code < 500 else RecalignError
            raise error(f"teacher server {self.url}{path}: {response.status_code}: {shorten(message, 300)}")
        return response.json()


Teacher = Union[TeacherService, TeacherClient]


def teacher_from_spec(spec: str | os.PathLike, *, run_dir: str | os.PathLike | None = None,
                      token: str | None = None, max_history: int | None = DEFAULT_MAX_HISTORY) -> Teacher:
    """A TeacherClient for "http(s)://...", else the TeacherService of a stage name (under run_dir) or folder.

    The client's token defaults to $RECALIGN_TOKEN.
    """
    text = str(spec)
    if text.startswith(("http://", "https://")):
        return TeacherClient(text, token if token is not None else (os.environ.get(TOKEN_ENV) or None),
                             max_history=max_history)
    candidates = [Path(text)]
    if run_dir is not None:
        candidates.insert(0, Path(run_dir) / "stages" / text)
    for folder in candidates:
        if folder.is_dir():
            return TeacherService.from_stage(folder, max_history=max_history)
    where = f" (looked in {shorten(candidates[0].parent, 200)})" if run_dir is not None else ""
    raise RecalignError(f"teacher {shorten(text)!r} is neither an http(s):// URL nor a teacher stage folder{where}")
