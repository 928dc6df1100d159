"""The reusable iteration store: "train → generate → score → train" loops that survive a kill.

A loop writes each finished iteration into its own folder under one work folder::

    work/
      state.json                 # {"config": fingerprint, "iterations": [record, ...], "updated": time}
      <initial>/                 # e.g. sft/: the starting checkpoint (iteration 0)
      <loop>/iter_<i>/           # one folder per finished iteration: whatever the loop saves + the marker
      tmp/                       # scratch for trainers (removed by `clean_scratch`)

An iteration folder is filled under a temporary name and renamed into place only when complete, and its record
(the marker file, `metrics.json` by default) is written last inside it: a folder with its marker is a finished
iteration, anything else never existed. A resumed loop skips every finished iteration (`pending`) and continues
from the last one (`previous`). The state file repeats the records for reading, and carries the config
fingerprint, so a work folder written by a different config is refused instead of silently mixed.

Used by SPRec (`recalign.methods.sprec.algorithm`); RecLM-gen's PPO and TrackRec's alternating loop are meant to use it too.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from recalign.errors import ConfigError
from recalign.io import atomic_folder, make_dirs, read_json, write_json

__all__ = ["IterationStore", "ITER_PREFIX", "stable_hash"]

ITER_PREFIX = "iter_"


class IterationStore:
    """Iteration folders, a state file and atomic checkpoints under `root`; a killed loop resumes where it stopped.

    `fingerprint`: what the stored iterations depend on (e.g. the config without the fields that may grow between
    attempts, such as the number of iterations); a state file with another fingerprint is a `ConfigError`.
    `key_fields`: the record fields that identify an iteration (a re-committed iteration replaces its record).
    """

    def __init__(self, root: str | Path, fingerprint: Any = None, *, marker: str = "metrics.json",
                 state_file: str = "state.json", key_fields: Sequence[str] = ("loop", "iteration")):
        self.root = make_dirs(root)
        self.marker, self.state_path, self.key_fields = marker, self.root / state_file, tuple(key_fields)
        self.state = self._load(fingerprint)

    # ---- where things are -------------------------------------------------------------------------------

    def folder(self, loop: str, iteration: int | None = None) -> Path:
        """root/<loop>/iter_<iteration>, or root/<loop> for a named checkpoint (iteration None)."""
        base = self.root / loop
        return base if iteration is None else base / f"{ITER_PREFIX}{iteration}"

    @property
    def scratch(self) -> Path:
        """A scratch folder for trainer output (not a checkpoint)."""
        return self.root / "tmp"

    def clean_scratch(self) -> None:
        """Remove the scratch folder."""
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)

    # ---- what is finished -----------------------------------------------------------------------------------

    def done(self, folder: Path) -> bool:
        """True when `folder` is a finished checkpoint (its marker exists)."""
        return (folder / self.marker).is_file()

    def finished(self, loop: str) -> list[int]:
        """The finished iterations of `loop`, ascending."""
        base = self.root / loop
        found = [int(f.name[len(ITER_PREFIX):]) for f in base.glob(f"{ITER_PREFIX}*")
                 if f.name[len(ITER_PREFIX):].isdigit() and self.done(f)] if base.is_dir() else []
        return sorted(found)

    def last_done(self, loop: str) -> int:
        """The last finished iteration of `loop` counting up from 1 without gaps (0 when none)."""
        done, last = set(self.finished(loop)), 0
        while last + 1 in done:
            last += 1
        return last

    def pending(self, loop: str, iterations: int, start: int = 1) -> Iterator[int]:
        """The iterations start..iterations of `loop` that are not finished, in order (checked as the loop goes)."""
        for iteration in range(start, iterations + 1):
            if not self.done(self.folder(loop, iteration)):
                yield iteration

    def previous(self, loop: str, iteration: int, initial: Path) -> Path:
        """The checkpoint iteration `iteration` starts from: iteration - 1 of `loop`, or `initial` for the first."""
        return initial if iteration <= 1 else self.folder(loop, iteration - 1)

    def record(self, folder: Path) -> dict:
        """The record (marker JSON) of a finished checkpoint."""
        return read_json(folder / self.marker)

    @property
    def records(self) -> list[dict]:
        """Every committed record, in commit order."""
        return list(self.state["iterations"])

    # ---- writing ------------------------------------------------------------------------------------------------

    def commit(self, folder: Path, record: dict, write: Callable[[Path], Any] | None = None) -> Path:
        """Finish one iteration: `write(tmp)` fills a temp folder, the record goes in last, then one rename.

        The state file is updated afterwards (a record with the same `key_fields` values is replaced).
        """
        with atomic_folder(folder, replace=True, fixed_tmp=True) as tmp:
            if write is not None:
                write(tmp)
            write_json(tmp / self.marker, record)
        key = self._key(record)
        self.state["iterations"] = [r for r in self.state["iterations"] if self._key(r) != key] + [record]
        self.state["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json(self.state_path, self.state)
        return folder

    # ---- internals --------------------------------------------------------------------------------------------

    def _key(self, record: dict) -> tuple:
        return tuple(record.get(field) for field in self.key_fields)

    def _load(self, fingerprint: Any) -> dict:
        if not self.state_path.is_file():
            return {"config": fingerprint, "iterations": []}
        try:
            state = read_json(self.state_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.state_path}: unreadable state file ({exc}); use a fresh work folder") from None
        if not isinstance(state, dict) or state.get("config") != fingerprint:
            raise ConfigError(f"{self.state_path}: written by a different config; use a fresh work folder")
        state.setdefault("iterations", [])
        return state


def stable_hash(value: Any) -> str:
    """A short hash of a JSON-able value (keys sorted), used to notice changed stage configs."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
