"""Data-parallel evaluation over Ray (`eval.backend: ray`): contiguous shards, one engine per worker, results in order.

A `WorkerPool` starts `workers` Ray actors; each builds its own object with `factory(*args)` on its worker (e.g. an
LLM generation engine loaded from a saved stage folder: no live model travels between processes) and runs with
torch on `threads` threads. `pool.map(method, shards)` calls `method(*shard)` on actor i for shard i and returns the
results in shard order. Ray is started locally (`num_cpus = workers`) unless it is connected already or
`RAY_ADDRESS` names a cluster to join.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from recalign.errors import ConfigError, RecalignError

RAY_HINT = "pip install 'recalign[ray]'"


def import_ray():
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"eval.backend: ray needs the 'ray' package ({RAY_HINT})") from None
    return ray


def connect(workers: int, attempts: int = 3):
    """Join the running Ray instance, the cluster at RAY_ADDRESS, or start a local one with `workers` CPUs.

    A local start is tried `attempts` times: Ray gives its raylet a fixed 30 s to register, which a busy machine
    can miss. A start that still fails is one RecalignError line.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    failure = ""
    for _ in range(1 if address else attempts):
        try:
            if address:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
            return ray
        except Exception as exc:  # noqa: BLE001  (Ray raises a bare Exception when its start-up times out)
            failure = (str(exc).splitlines() or [type(exc).__name__])[0]
            ray.shutdown()
    where = f"the Ray cluster at RAY_ADDRESS={address}" if address else f"a local Ray instance ({attempts} tries)"
    raise RecalignError(f"eval.backend ray: could not start or join {where}: {failure}; "
                        f"use eval.backend local, or start Ray first (ray start --head) and set RAY_ADDRESS")


def shard_bounds(n: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """At most `shards` contiguous, non-empty [start, stop) ranges covering 0..n, cut at multiples of `align`.

    Cutting at multiples of the generation batch size keeps every row in the batch it has in-process, so padding
    and hence the answers are the same. Blocks of `align` rows are spread as evenly as possible, earlier shards
    taking the remainder.
    """
    if shards < 1 or align < 1:
        raise ConfigError(f"shards and align must be >= 1, got {shards} and {align}")
    blocks = -(-n // align)
    base, extra = divmod(blocks, shards)
    bounds, start = [], 0
    for shard in range(shards):
        stop = min(n, start + (base + (shard < extra)) * align)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds


class _Host:
    """A Ray actor's body: one object built by `factory(*args)` on the worker, torch on `threads` threads."""

    def __init__(self, factory: Callable[..., Any], args: tuple, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.target = factory(*args)

    def call(self, method: str, *args: Any) -> Any:
        """`target.method(*args)` on this worker."""
        return getattr(self.target, method)(*args)

    def threads(self) -> int:
        """torch's intra-op threads on this worker."""
        import torch

        return torch.get_num_threads()


class WorkerPool:
    """`workers` Ray actors, each holding its own `factory(*args)`; `map` runs one shard per actor, in order."""

    def __init__(self, factory: Callable[..., Any], args: tuple = (), workers: int = 2, threads: int = 1,
                 num_gpus: float = 0.0):
        if workers < 1:
            raise ConfigError(f"eval.workers must be >= 1, got {workers}")
        self.ray = connect(workers)
        actor = self.ray.remote(num_cpus=threads, num_gpus=num_gpus)(_Host)
        self.actors = [actor.remote(factory, args, threads) for _ in range(workers)]

    def __len__(self) -> int:
        return len(self.actors)

    def map(self, method: str, shards: Sequence[tuple]) -> list:
        """`method(*shards[i])` on actor i for every shard (at most one per actor), results in shard order."""
        if len(shards) > len(self.actors):
            raise ConfigError(f"{len(shards)} shards for {len(self.actors)} Ray workers")
        return self._get([actor.call.remote(method, *shard) for actor, shard in zip(self.actors, shards)])

    def threads(self) -> list[int]:
        """torch's thread count on every worker."""
        return self._get([actor.threads.remote() for actor in self.actors])

    def _get(self, refs: list) -> list:
        """Wait for `refs`; a project error raised on a worker is re-raised here as itself (one line in the CLI)."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            cause = _project_cause(exc)
            if cause is not None:
                raise cause from None
            raise

    def close(self) -> None:
        """Stop the actors (their engines are freed); Ray itself keeps running for the next pool."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _project_cause(exc: BaseException) -> RecalignError | None:
    """The RecalignError behind a Ray task or actor error, if any (Ray wraps it, sometimes twice)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, RecalignError) and type(exc).__module__ == "recalign.errors":
            return exc
        exc = getattr(exc, "cause", None) or getattr(exc, "__cause__", None)
        seen += 1
    return None
