"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""

from __future__ import annotations

import contextlib
from typing import Iterator


class RecalignError(Exception):
    """A problem with the user's input: bad file, bad config, unknown item, bad request."""

    exit_code = 2


class DataError(RecalignError):
    """A raw or prepared data file cannot be read; the message names file, line and field."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.path, self.line, self.field = path, line, field


class ConfigError(RecalignError):
    """A recipe or `key=value` override is invalid; the message names the key."""


class UnsafePickleError(DataError):
    """A pickle file tried to build something other than plain containers and scalars."""


class RequestError(RecalignError):
    """A request to a service names an unknown item, user or category, or does not fit its shape."""


class OutputError(RecalignError):
    """An output file or folder cannot be written (read-only folder, a file in the way, disk full ...)."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"cannot write {shorten(str(path), 200)}: {reason}")
        self.path, self.reason = path, reason


class FolderLockedError(OutputError):
    """Another live process writes the same run folder or --out; the message names it (pid, host, start time)."""

    def __init__(self, path: object, reason: str, holder: dict | None = None):
        super().__init__(path, reason)
        self.holder = holder or {}


def shorten(text: object, limit: int = 60) -> str:
    """User input as echoed in an error: its first `limit` characters and '...' when longer, on one line."""
    value = str(text)[:4 * limit]  # enough to fill `limit` characters even after escaping
    value = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)  # control characters stay visible
    return value if len(value) <= limit and len(str(text)) <= 4 * limit else value[:limit] + "..."


def quoted(text: object, limit: int = 60) -> str:
    """`shorten` in single quotes, the way errors name a user's key or value."""
    return f"'{shorten(text, limit)}'"


@contextlib.contextmanager
def writing(path: object) -> Iterator[None]:
    """Report an OSError raised while writing output under `path` as an OutputError naming `path`."""
    try:
        yield
    except OSError as exc:
        raise OutputError(path, exc.strerror or str(exc)) from None
