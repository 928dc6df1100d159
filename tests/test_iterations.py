"""The reusable iteration store (recalign.checkpoints): atomic checkpoints, state, resume after a kill."""

from __future__ import annotations

import json

import pytest

from recalign.errors import ConfigError
from recalign.checkpoints import IterationStore

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


class Killed(Exception):
    """A simulated kill in the middle of an iteration."""


def _toy_loop(root, iterations: int, calls: list[int], kill_at: int | None = None) -> IterationStore:
    """x_0 = 1, x_i = 2 * x_{i-1} + i: each iteration reads the previous checkpoint and writes its own."""
    store = IterationStore(root, fingerprint={"rule": "2x+i"})
    initial = store.folder("init")
    if not store.done(initial):
        calls.append(0)
        store.commit(initial, {"loop": "init", "iteration": 0, "x": 1}, write=lambda tmp: (tmp / "x.txt").write_text("1"))
    for iteration in store.pending("toy", iterations):
        calls.append(iteration)
        x = int((store.previous("toy", iteration, initial) / "x.txt").read_text())
        value = 2 * x + iteration

        def write(tmp, value=value):
            (tmp / "x.txt").write_text(str(value))
            if iteration == kill_at:
                raise Killed(f"killed while saving iteration {iteration}")

        store.commit(store.folder("toy", iteration), {"loop": "toy", "iteration": iteration, "x": value}, write)
    return store


def test_a_killed_loop_resumes_at_the_killed_iteration_without_recomputing(tmp_path):
    calls: list[int] = []
    with pytest.raises(Killed):
        _toy_loop(tmp_path, 4, calls, kill_at=2)
    assert calls == [0, 1, 2]
    store = IterationStore(tmp_path, fingerprint={"rule": "2x+i"})
    assert store.finished("toy") == [1] and store.last_done("toy") == 1
    assert not store.folder("toy", 2).exists()                     # the half-written iteration left nothing
    assert not [p.name for p in (tmp_path / "toy").iterdir() if p.name.startswith(".")]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "init" / "x.txt", tmp_path / "toy" / "iter_1" / "x.txt")}

    calls.clear()
    store = _toy_loop(tmp_path, 4, calls)
    assert calls == [2, 3, 4]                                       # 0 and 1 were not computed again
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    # x: 1 -> 3 -> 8 -> 19 -> 42, the same as an uninterrupted run
    assert [r["x"] for r in store.records] == [1, 3, 8, 19, 42]
    assert store.record(store.folder("toy", 4)) == {"loop": "toy", "iteration": 4, "x": 42}
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["config"] == {"rule": "2x+i"} and [r["iteration"] for r in state["iterations"]] == [0, 1, 2, 3, 4]
    assert store.last_done("toy") == 4

    calls.clear()
    _toy_loop(tmp_path, 6, calls)                                   # asking for more iterations continues
    assert calls == [5, 6]


def test_uninterrupted_run_gives_the_same_records(tmp_path):
    calls: list[int] = []
    store = _toy_loop(tmp_path, 4, calls)
    assert calls == [0, 1, 2, 3, 4] and [r["x"] for r in store.records] == [1, 3, 8, 19, 42]


def test_a_recommitted_iteration_replaces_its_record(tmp_path):
    store = IterationStore(tmp_path, fingerprint=None)
    store.commit(store.folder("a", 1), {"loop": "a", "iteration": 1, "v": 1})
    store.commit(store.folder("a", 1), {"loop": "a", "iteration": 1, "v": 2})
    assert store.records == [{"loop": "a", "iteration": 1, "v": 2}]
    assert store.record(store.folder("a", 1))["v"] == 2


def test_a_state_from_another_config_is_refused(tmp_path):
    _toy_loop(tmp_path, 1, [])
    with pytest.raises(ConfigError, match="different config"):
        IterationStore(tmp_path, fingerprint={"rule": "3x"})
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        IterationStore(tmp_path, fingerprint={"rule": "2x+i"})
