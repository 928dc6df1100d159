"""A restricted unpickler for the seed repositories' pickle files: builtin containers and scalars only.

Plain `pickle.load` runs whatever callable a file names (`os.system`, ...). Here `find_class` refuses every global,
so only what the pickle protocol builds natively can come out: dict, list, tuple, set, frozenset, str, bytes,
int, float, bool, None. That covers the seed formats (RecGPT `test.pkl`: dict int -> list[int]; RecLM-gen
`sequential.pickle` / `meta.pickle` / `category.pickle`: dicts of strings, ints and lists).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

from recalign.errors import DataError, UnsafePickleError


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose global lookup refuses everything."""

    def __init__(self, handle, source: str):
        super().__init__(handle)
        self._source = source

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        raise UnsafePickleError(f"restricted unpickler refuses global '{module}.{name}' (only builtin containers "
                                f"and scalars are allowed)", path=self._source)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"restricted unpickler refuses persistent id {pid!r}", path=self._source)


def safe_loads(data: bytes, source: str = "<bytes>"):
    """Unpickle `data` allowing only builtin containers and scalars; `source` names it in errors."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as exc:
        # Truncated or corrupt pickles raise a zoo of exception types; all mean "not a readable pickle".
        raise DataError(f"not a readable pickle ({type(exc).__name__}: {exc})".replace("\n", " "),
                        path=source) from None


def safe_load(path: str | os.PathLike):
    """Read a pickle file allowing only builtin containers and scalars (never plain pickle.load)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path=path)
    return safe_loads(path.read_bytes(), source=str(path))
