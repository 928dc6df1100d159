"""The restricted unpickler: builtin data loads, anything naming a global is refused."""

from __future__ import annotations

import collections
import os
import pickle

import pytest

from recalign.data.safe_pickle import safe_load, safe_loads
from recalign.errors import DataError, UnsafePickleError


class _RunsSystem:
    """Pickles to a call of os.system: the classic pickle exploit."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_builtin_containers_round_trip(tmp_path, protocol):
    data = {6: [1, 2, 3], 7: [], "meta": {"title": "A", "cats": ("x", "y"), "score": 1.5, "flag": None},
            "big": 2 ** 70, "neg": -1, "t": True}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert safe_load(path) == data


def test_sets_and_bytes_with_native_opcodes(tmp_path):
    # protocol >= 4 has opcodes for sets and bytes; older protocols spell them as globals (refused below)
    data = {"set": {1, 2}, "frozen": frozenset({"a"}), "bytes": b"\x00"}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    assert safe_load(path) == data
    with pytest.raises(UnsafePickleError, match=r"refuses global .*\.set"):
        safe_loads(pickle.dumps({1, 2}, protocol=2))


def test_callable_reference_is_refused_naming_file_and_global(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"x": _RunsSystem()}))
    with pytest.raises(UnsafePickleError) as err:
        safe_load(path)
    message = str(err.value)
    assert "evil.pkl" in message and "refuses global" in message
    assert ("'posix.system'" in message) or ("'os.system'" in message) or ("'nt.system'" in message)
    assert "\n" not in message
    assert isinstance(err.value, DataError)  # the CLI prints it as a one-line data error


def test_any_class_is_refused_even_harmless_ones():
    with pytest.raises(UnsafePickleError, match="collections.OrderedDict"):
        safe_loads(pickle.dumps(collections.OrderedDict(a=1)), source="od.pkl")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        safe_load(tmp_path / "nope.pkl")
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({1: [1, 2, 3]})[:-4])
    with pytest.raises(DataError, match="cut.pkl: not a readable pickle"):
        safe_load(path)
