"""Defects of issue 24: two commands writing one folder (run-folder lock), UTF-16 raw files, a full disk while a
stage commits. Tiny data and `popularity` teachers, so each test takes seconds."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from recalign.cli import app
from recalign.data.dataset import build_dataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# A `recalign` command line with one extra stage kind, `nap` (it signals through $NAP_SIGNAL, then sleeps): the
# first command of a lock test, holding its run folder while it naps.
NAPPER = """
import os, sys, time
from pydantic import BaseModel
import recalign.methods as methods
from recalign.stages import Stage

class NapStageConfig(BaseModel):
    seconds: float = 120.0

def nap(ctx, params):
    open(os.environ["NAP_SIGNAL"], "w").close()
    time.sleep(params.seconds)
    return {"slept": params.seconds}

methods.STAGE_KINDS["nap"] = Stage(params=NapStageConfig, run=nap)
from recalign.cli import app
app(sys.argv[1:], prog_name="recalign")
"""

# Holds a folder with the lock helper, signals through argv[3], then sleeps (to be killed with -9).
HOLDER = """
import sys, time
from recalign.io import folder_lock
with folder_lock(sys.argv[1], sys.argv[2]):
    open(sys.argv[3], "w").close()
    time.sleep(120)
"""


def recalign(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    """`recalign ARGS` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "recalign.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def one_error_line(stderr: str, *fragments: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("recalign: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder` with its size, modification time and (for files) content."""
    state = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        state[str(path.relative_to(folder))] = (info.st_size if content is not None else 0, info.st_mtime_ns, content)
    return state


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the first command ended early: {process.communicate()}")
        assert time.monotonic() < deadline, "the first command never started its stage"
        time.sleep(0.1)


def kill_9(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture
def prepared(tmp_path) -> Path:
    """A prepared dataset folder: 20 users x 6 interactions over 12 items."""
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{int(rng.integers(12))}", t) for u in range(20) for t in range(6)]
    folder = tmp_path / "prepared"
    build_dataset(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), name="tiny", source="test").save(folder)
    return folder


def write_recipe(path: Path, prepared: Path, *stages: str) -> Path:
    """A recipe on `prepared` whose stages are given as YAML flow mappings."""
    path.write_text(f"name: defects\ndata: {{path: {prepared}}}\neval: {{ks: [5]}}\nstages:\n"
                    + "".join(f"  - {stage}\n" for stage in stages))
    return path


POP = "{name: pop, kind: teacher, params: {model: popularity}}"
POP2 = "{name: pop2, kind: teacher, params: {model: popularity}}"


# ---- 1. two commands on one folder ---------------------------------------------------------------------------

def test_second_run_on_a_busy_folder_is_refused_and_a_killed_holder_is_taken_over(tmp_path, prepared):
    run_dir = tmp_path / "run"
    signal_file = tmp_path / "napping"
    nap = write_recipe(tmp_path / "nap.yaml", prepared, "{name: nap, kind: nap}")
    pop = write_recipe(tmp_path / "pop.yaml", prepared, POP)
    first = subprocess.Popen([sys.executable, "-c", NAPPER, "run", str(nap), "--out", str(run_dir), "-q"],
                             env={**ENV, "NAP_SIGNAL": str(signal_file)}, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(signal_file, first)
        before = snapshot(run_dir)
        second = recalign("run", pop, "--out", run_dir, "-q")
        assert second.returncode == 2, (second.returncode, second.stdout, second.stderr)
        line = one_error_line(second.stderr, str(run_dir), f"pid {first.pid}", socket.gethostname(), "started ")
        assert "Traceback" not in second.stderr and line.count("recalign run") == 1
        teacher = recalign("teacher", "train", "popularity", "--data", prepared, "--out", run_dir, "-q")
        assert teacher.returncode == 2, (teacher.returncode, teacher.stderr)
        one_error_line(teacher.stderr, str(run_dir), f"pid {first.pid}")
        assert snapshot(run_dir) == before  # the refused commands changed nothing
        assert first.poll() is None  # the first one still runs, undisturbed
    finally:
        kill_9(first)
    again = recalign("run", pop, "--out", run_dir, "-q")  # the dead holder's lock is taken over
    assert again.returncode == 0, again.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["stages"]["pop"]["kind"] == "teacher"
    assert not (run_dir / ".lock").exists()


def test_data_prepare_into_a_busy_out_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "out"
    signal_file = tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "data prepare", str(signal_file)], env=ENV,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    options = ["n_users=20", "n_items=30", "min_length=5", "max_length=8"]
    try:
        wait_for(signal_file, holder)
        before = snapshot(out)
        refused = recalign("data", "prepare", "synthetic", "--out", out, *options)
        assert refused.returncode == 2, (refused.returncode, refused.stdout, refused.stderr)
        one_error_line(refused.stderr, str(out), f"pid {holder.pid}", socket.gethostname(), "recalign data prepare")
        assert snapshot(out) == before
    finally:
        kill_9(holder)
    done = recalign("data", "prepare", "synthetic", "--out", out, *options)
    assert done.returncode == 0, done.stderr
    assert (out / "dataset.json").is_file() and not (out / ".lock").exists()


def test_lock_helper_refuses_a_second_holder_and_cleans_up(tmp_path):
    from recalign.errors import RecalignError
    from recalign.io import FolderBusyError, folder_lock
    from recalign.runs import lock_folder

    folder = tmp_path / "fresh"
    with folder_lock(folder, "run"):
        assert (folder / ".lock").is_file()
        holder = json.loads((folder / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"):
            with folder_lock(folder, "run"):
                pass
        with pytest.raises(RecalignError, match="in use by"):  # the project error, for the CLI's one line
            with lock_folder(folder, "run"):
                pass
    assert not folder.exists()  # created by the lock and left empty: removed with it
    kept = tmp_path / "kept"
    kept.mkdir()
    with folder_lock(kept, "data prepare"):
        (kept / "file").write_text("x")
    assert sorted(p.name for p in kept.iterdir()) == ["file"]


def test_processes_launcher_is_refused_before_launching(tmp_path, prepared):
    from recalign.io import folder_lock

    run_dir = tmp_path / "run"
    pop = write_recipe(tmp_path / "pop.yaml", prepared, POP)
    with folder_lock(run_dir, "run"):
        before = snapshot(run_dir)
        refused = recalign("run", pop, "--out", run_dir, "--processes", "2", "-q", timeout=120)
        assert refused.returncode == 2, (refused.returncode, refused.stderr[-2000:])
        one_error_line(refused.stderr, str(run_dir), f"pid {os.getpid()}")
        assert snapshot(run_dir) == before


# ---- 2. UTF-16 raw files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec, flavour", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16LE"),  # a BOM, or none
                                             ("utf-16-be", "UTF-16BE")])
def test_utf16_raw_file_is_named_with_how_to_convert_it(tmp_path, codec, flavour):
    raw = tmp_path / "plays.tsv"
    raw.write_bytes("user_id\titem_id\n1\t2\n2\t3\n".encode(codec))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "prepare", "tabular", "--raw", str(raw), "--out", str(out)])
    assert result.exit_code == 2, (result.exit_code, result.output)
    line = one_error_line(result.stderr, f"{raw}: UTF-16 text, not UTF-8",
                          f"iconv -f {flavour} -t UTF-8 {raw} > {raw}.utf8")
    assert "NUL byte" not in line and "binary" not in line
    assert not out.exists()


def test_utf16_json_lines_file_is_named_with_how_to_convert_it(tmp_path):
    raw = tmp_path / "Toy_5.json"
    review = {"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 100}
    raw.write_bytes((json.dumps(review) + "\n").encode("utf-16-le"))  # no BOM: NUL at every other byte
    result = CliRunner().invoke(app, ["data", "prepare", "amazon2014", "--raw", str(raw), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2, (result.exit_code, result.output)
    one_error_line(result.stderr, f"{raw}: UTF-16 text", f"iconv -f UTF-16LE -t UTF-8 {raw} > {raw}.utf8")


def test_binary_file_is_still_reported_as_binary(tmp_path):
    raw = tmp_path / "plays.tsv"
    raw.write_bytes(b"user_id\titem_id\n1\t2\x00\n")
    result = CliRunner().invoke(app, ["data", "prepare", "tabular", "--raw", str(raw), "--out", str(tmp_path / "o")])
    one_error_line(result.stderr, "plays.tsv:2", "NUL byte: a binary file, not text")


# ---- 3. a full disk while a stage commits ------------------------------------------------------------------------

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(run_dir: Path) -> list[str]:
    """Temp files and folders (atomic writes, stage commits) left anywhere in the run folder."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp" in p.name or ".old" in p.name)


def test_full_disk_while_writing_a_stage_keeps_finished_stages_and_resumes(tmp_path, prepared, monkeypatch):
    from recalign import io

    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", prepared, POP, POP2)
    real_write = io.write_bytes_atomic

    def full_in_pop2(path, data):
        if ".pop2." in str(path):  # every file the second stage writes into its temp folder
            _no_space()
        return real_write(path, data)

    monkeypatch.setattr(io, "write_bytes_atomic", full_in_pop2)
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(run_dir), "-q"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    one_error_line(result.stderr, "No space left on device", str(run_dir))
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["pop"]
    assert _leftovers(run_dir) == [] and not (run_dir / ".lock").exists()
    finished = snapshot(run_dir / "stages" / "pop")
    monkeypatch.undo()
    again = CliRunner().invoke(app, ["run", str(recipe), "--out", str(run_dir), "-q"])
    assert again.exit_code == 0, (again.output, again.exception)
    assert snapshot(run_dir / "stages" / "pop") == finished  # skipped, not redone
    assert set(json.loads((run_dir / "metrics.json").read_text())["stages"]) == {"pop", "pop2"}


def test_full_disk_while_renaming_a_stage_into_place_keeps_its_previous_version(tmp_path, prepared, monkeypatch):
    from recalign import io

    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", prepared, POP, POP2)
    assert CliRunner().invoke(app, ["run", str(recipe), "--out", str(run_dir), "-q"]).exit_code == 0
    before = snapshot(run_dir / "stages")
    real_replace = os.replace

    def full_on_pop2_rename(source, target, **kwargs):
        if Path(source).name == ".pop2.tmp":  # the stage commit: temp folder -> stages/pop2
            _no_space()
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(io.os, "replace", full_on_pop2_rename)
    changed = ["stages.pop2.params.seed=7"]  # pop2 must run again
    result = CliRunner().invoke(app, ["run", str(recipe), *changed, "--out", str(run_dir), "-q"])
    monkeypatch.undo()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    one_error_line(result.stderr, "No space left on device", str(run_dir))
    assert snapshot(run_dir / "stages") == before  # the finished version of pop2 is still there, untouched
    assert _leftovers(run_dir) == [] and not (run_dir / ".lock").exists()
    again = CliRunner().invoke(app, ["run", str(recipe), *changed, "--out", str(run_dir), "-q"])
    assert again.exit_code == 0, (again.output, again.exception)
    assert json.loads((run_dir / "stages" / "pop2" / "DONE").read_text()) != json.loads(before["pop2/DONE"][2])
    assert _leftovers(run_dir) == []
