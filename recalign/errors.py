"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""

from __future__ import annotations


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
