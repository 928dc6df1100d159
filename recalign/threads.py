"""How many CPU threads torch uses for training and evaluation: one `threads` setting with a measured default.

Measured (BENCHMARKS.md, "Threads"): on the project's busy 2-core machine one torch thread trained an epoch of
BPR-MF 6-7x and of SASRec about 5x faster than two threads, with identical metrics. So the default is 1. A setting of None means "the global default": `set_default_threads(n)`, else the
RECALIGN_THREADS environment variable, else 1.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch

from recalign.errors import ConfigError

DEFAULT_THREADS = 1
ENV_VAR = "RECALIGN_THREADS"
_default: int | None = None

F = TypeVar("F", bound=Callable)


def default_threads() -> int:
    """The global default thread count: set_default_threads(), else $RECALIGN_THREADS, else 1."""
    if _default is not None:
        return _default
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        return DEFAULT_THREADS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{ENV_VAR} must be a positive integer, got {raw!r}")
    return value


def set_default_threads(threads: int | None) -> None:
    """Set (None: unset) the global default used by every `threads: None` setting."""
    global _default
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    _default = threads


def resolve_threads(threads: int | None) -> int:
    """An explicit thread count, or the global default for None."""
    return default_threads() if threads is None else threads


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with torch.set_num_threads(threads or the default); the previous count is restored after."""
    wanted = resolve_threads(threads)
    previous = torch.get_num_threads()
    if wanted != previous:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def uses_config_threads(method: F) -> F:
    """Decorate a method of an object with `self.config.threads` so it runs under that thread count."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch_threads(getattr(self.config, "threads", None)):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
