"""A restricted unpickler for the seed repositories' pickle files: builtin containers and scalars only.

Plain `pickle.load` runs whatever callable a file names (`os.system`, ...). Here `find_class` refuses every global,
so only what the pickle protocol builds natively can come out: dict, list, tuple, set, frozenset, str, bytes,
int, float, bool, None. That covers the seed formats (RecGPT `test.pkl`: dict int -> list[int]; RecLM-gen
`sequential.pickle` / `meta.pickle` / `category.pickle`: dicts of strings, ints and lists).

`load_npy_object` reads `.npy` files that hold a pickled object array (P5/TransRec `title_maps.npy`): the `.npy`
header is parsed by hand and the pickle after it may name only NumPy's array reconstruction globals
(`_reconstruct`, `ndarray`, `dtype`); everything inside must again be builtin containers and scalars.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
from pathlib import Path

import numpy as np

from recalign.data.rawfile import read_raw_bytes
from recalign.errors import DataError, UnsafePickleError

# the globals NumPy's object-array pickles need, and nothing else (numpy 1.x and 2.x module names)
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy._core.multiarray", "_reconstruct"): lambda: np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}
_NPY_MAGIC = b"\x93NUMPY"


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose global lookup refuses everything."""

    def __init__(self, handle, source: str, allow_numpy: bool = False):
        super().__init__(handle)
        self._source = source
        self._allow_numpy = allow_numpy

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if self._allow_numpy and (module, name) in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[(module, name)]()
        raise UnsafePickleError(f"restricted unpickler refuses global '{module}.{name}' (only builtin containers "
                                f"and scalars are allowed)", path=self._source)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"restricted unpickler refuses persistent id {pid!r}", path=self._source)


def safe_loads(data: bytes, source: str = "<bytes>", allow_numpy: bool = False):
    """Unpickle `data` allowing only builtin containers and scalars (+ NumPy arrays when `allow_numpy`)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source, allow_numpy).load()
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
    return safe_loads(read_raw_bytes(path), source=str(path))


def load_npy_object(path: str | os.PathLike):
    """The Python object inside a `.npy` file holding a pickled 0-d object array (never np.load(allow_pickle))."""
    path = Path(path)
    data = read_raw_bytes(path)
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        raise DataError("not a .npy file (no \\x93NUMPY header)", path=path)
    major = data[6]
    size_bytes = 2 if major == 1 else 4
    header_len = int.from_bytes(data[8:8 + size_bytes], "little")
    start = 8 + size_bytes
    try:
        header = ast.literal_eval(data[start:start + header_len].decode("latin-1").strip())
        descr = header["descr"]
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        raise DataError("unreadable .npy header", path=path) from None
    if descr != "|O":
        raise DataError(f"expected a pickled object array in the .npy file, got dtype {descr!r}", path=path)
    array = safe_loads(data[start + header_len:], source=str(path), allow_numpy=True)
    if not isinstance(array, np.ndarray) or array.dtype != object:
        raise DataError(f"expected an object array, got {type(array).__name__}", path=path)
    return array.item() if array.ndim == 0 else array.tolist()
