"""What every recalign HTTP server shares: the FastAPI app factory, bearer-token auth, JSON errors, micro-batching.

A server module (teacher.py, later the LLM server) builds its app with `create_app`, protects its routes with
`bearer_auth`, and hands its batched model call to a `MicroBatcher`. Model calls run on one worker thread, so the
event loop keeps accepting requests while a batch is computed and the model never runs twice at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Generic, Iterator, Sequence, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from recalign.errors import ConfigError, RecalignError

TOKEN_ENV = "RECALIGN_TOKEN"  # the bearer token every server (and recalign.teachers.client) reads
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_ROWS = 20480  # the original teacher server's batch limit
DEFAULT_MAX_BODY_BYTES = 32 * 2**20  # a bigger request body is a 413 before it is read

Job = TypeVar("Job")
Result = TypeVar("Result")


# ---- binding and auth ------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_token(host: str, env: str = TOKEN_ENV) -> str | None:
    """The bearer token from $env (None when unset); binding beyond loopback without one is a ConfigError."""
    token = os.environ.get(env, "").strip() or None
    if token is None and not is_loopback(host):
        raise ConfigError(f"serving on {host} (not loopback) needs a bearer token: set the {env} environment "
                          "variable, or bind to 127.0.0.1")
    return token


def bearer_auth(token: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: no-op without a token; else 401 when the header is missing, 403 when it is wrong."""

    async def check(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header or scheme.lower() != "bearer" or not given.strip():
            raise StarletteHTTPException(401, "missing bearer token (header 'Authorization: Bearer <token>')",
                                         headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise StarletteHTTPException(403, "wrong bearer token")

    return check


# ---- the app ---------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every error answer: one line that says what was wrong."""

    error: str


ERROR_RESPONSES: dict[int | str, dict] = {  # documented in every operation's OpenAPI responses
    400: {"model": ErrorBody, "description": "unknown item, user, category or model, or too long for the model"},
    401: {"model": ErrorBody, "description": "missing bearer token (when the server has one)"},
    403: {"model": ErrorBody, "description": "wrong bearer token"},
    413: {"model": ErrorBody, "description": "request body larger than the server's limit"},
    422: {"model": ErrorBody, "description": "malformed JSON, or a body that does not fit the schema"},
}


def create_app(title: str, description: str = "", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app whose every error is a JSON body {"error": message} (4xx for the client's mistakes)."""
    if max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    app = FastAPI(title=title, description=description, docs_url=None, redoc_url=None, responses=ERROR_RESPONSES)
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(exc.errors())}, status_code=422)

    @app.exception_handler(RecalignError)
    async def _bad_request(request: Request, exc: RecalignError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    return app


class BodyLimit:
    """ASGI middleware: a request body above `max_body_bytes` is a JSON 413, checked on Content-Length before
    anything is read and on the bytes received for a body without one (chunked)."""

    def __init__(self, app: Callable, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body larger than the server's limit of {self.max_body_bytes} bytes"
        declared = dict(scope.get("headers", ())).get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            event = await receive()
            received += len(event.get("body", b"")) if event["type"] == "http.request" else 0
            if received > self.max_body_bytes:  # raised inside the body read: the route answers it as a JSON 413
                raise StarletteHTTPException(413, message)
            return event

        await self.app(scope, limited, send)


def validation_message(errors: Sequence[dict]) -> str:
    """Pydantic/FastAPI validation errors as one line: `field 'body.k': Input should be ... ; ...`."""
    parts = []
    for error in list(errors)[:5]:
        if error.get("type") == "json_invalid":
            parts.append(f"invalid JSON body: {error.get('ctx', {}).get('error', error.get('msg'))}")
            continue
        loc = ".".join(str(x) for x in error.get("loc", ()))
        parts.append(f"field '{loc}': {error.get('msg')}")
    more = len(errors) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# ---- micro-batching --------------------------------------------------------------------------------
class MicroBatcher(Generic[Job, Result]):
    """Gathers concurrent jobs for up to `max_wait_ms` (or until `max_rows` rows) and runs one batched call.

    `run(jobs) -> results` (same order) executes on the single model thread; `rows(job)` sizes a job. A job that
    fails alone fails its batch: check requests before submitting them.
    """

    def __init__(self, run: Callable[[list[Job]], list[Result]], *, rows: Callable[[Job], int] = lambda job: 1,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_rows: int = DEFAULT_MAX_ROWS):
        if max_wait_ms < 0 or max_rows < 1:
            raise ConfigError(f"max_wait_ms must be >= 0 and max_rows >= 1, got {max_wait_ms} and {max_rows}")
        self._run, self._rows = run, rows
        self.max_wait = max_wait_ms / 1000.0
        self.max_rows = max_rows
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recalign-model")
        self.batches = 0  # batched calls made, and the jobs they served (for /health and benchmarks)
        self.jobs = 0
        self._pending: collections.deque = collections.deque()  # (job, rows, future, arrival), oldest first
        self._pending_rows = 0
        self._queued: asyncio.Event | None = None  # something is pending
        self._full: asyncio.Event | None = None  # max_rows rows are pending
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, job: Job) -> Result:
        """Queue `job` for the next batch and wait for its result."""
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        rows = self._rows(job)
        self._pending.append((job, rows, future, loop.time()))
        self._pending_rows += rows
        self._queued.set()
        if self._pending_rows >= self.max_rows:
            self._full.set()
        return await future

    async def run_now(self, job: Job) -> Result:
        """Run `job` alone on the model thread (the `immediately` path)."""
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self.executor, self._run, [job]))[0]

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():  # first call, or a new event loop
            self._loop, self._queued, self._full = loop, asyncio.Event(), asyncio.Event()
            self._pending.clear()
            self._pending_rows = 0
            self._task = loop.create_task(self._worker())

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._queued.wait()
            remaining = self._pending[0][3] + self.max_wait - loop.time()  # the oldest job waits at most max_wait
            if not self._full.is_set() and remaining > 0:
                # waiting on an Event (not on a queue) so that a timeout can never swallow a job
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._full.wait(), remaining)
            await self._finish(self._take())

    def _take(self) -> list:
        """The oldest pending jobs, up to max_rows rows (at least one job)."""
        batch, rows = [], 0
        while self._pending and (not batch or rows + self._pending[0][1] <= self.max_rows):
            job, size, future, _ = self._pending.popleft()
            batch.append((job, future))
            rows += size
        self._pending_rows -= rows
        if self._pending_rows < self.max_rows:
            self._full.clear()
        if not self._pending:
            self._queued.clear()
        return batch

    async def _finish(self, batch: list) -> None:
        jobs = [job for job, _ in batch]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self._run, jobs)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        self.jobs += len(jobs)
        for (_, future), result in zip(batch, results):
            if not future.done():  # the client may have gone away
                future.set_result(result)

    def close(self) -> None:
        """Stop the worker task and the model thread."""
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self.executor.shutdown(wait=False, cancel_futures=True)


# ---- running ---------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
    """Serve `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def serving_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int | None = None,
                      timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread; yields its base URL and stops it on exit."""
    import uvicorn

    port = free_port(host) if port is None else port
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="recalign-uvicorn", daemon=True)
    thread.start()
    started = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - started > timeout:
            server.should_exit = True
            raise RecalignError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
