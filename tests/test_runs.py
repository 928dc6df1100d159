"""Run folders: layout, resume after a failed stage, config-change re-runs, seeding, reports."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import BaseModel, ConfigDict

from recalign import stages
import recalign.methods as methods
from recalign.recipes import recipe_from_dict
from recalign.data.dataset import build_dataset
from recalign.errors import RecalignError
from recalign.stages import RunContext
from recalign.runs import run_recipe

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

CALLS: list[str] = []


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: int = 1
    fail: bool = False
    teacher: str | None = None


def toy_run(ctx: RunContext, params: ToyConfig) -> dict:
    """Record the call, write an artifact, draw from the seeded global generators, maybe fail."""
    CALLS.append(ctx.stage.name)
    (ctx.stage_dir / "artifact.txt").write_text(str(params.value))
    if params.teacher is not None:  # reads an earlier stage's output
        upstream = int((ctx.stage_output(params.teacher) / "artifact.txt").read_text())
    else:
        upstream = 0
    if params.fail:
        raise RecalignError("toy stage failed on purpose")
    ctx.log("toy stage ran")
    return {"value": params.value + upstream, "draw": float(torch.rand(1)) + float(np.random.rand()),
            "n_train": len(ctx.split.train)}


@pytest.fixture(autouse=True)
def toy_stage_kind(monkeypatch):
    module = types.ModuleType("recalign_test_runs_stages")
    module.TOY = stages.Stage(params=ToyConfig, run=toy_run,  # `teacher` names the stage it reads
                              depends_on=lambda p, names: {"teacher": p.teacher} if p.teacher else {})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(methods.STAGE_KINDS, "toy", module.TOY)
    CALLS.clear()


@pytest.fixture
def dataset_dir(tmp_path):
    """A prepared dataset folder: 12 users x 6 time-ordered interactions over 10 items."""
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{int(rng.integers(10))}", t) for u in range(12) for t in range(6)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    folder = tmp_path / "prepared"
    build_dataset(frame, name="toy", source="test").save(folder)
    return folder


def recipe(dataset_dir, **stage_params):
    """Two toy stages; `stage_params` maps stage name -> params."""
    return recipe_from_dict({
        "name": "toy-run", "seed": 5, "data": {"path": str(dataset_dir)},
        "stages": [{"name": "first", "kind": "toy", "params": stage_params.get("first", {})},
                   {"name": "second", "kind": "toy", "params": stage_params.get("second", {"teacher": "first"})}],
    })


def test_run_folder_layout(tmp_path, dataset_dir):
    run_dir = tmp_path / "run"
    summary = run_recipe(recipe(dataset_dir), run_dir, progress=False)
    for name in ("config.yaml", "dataset.json", "metrics.json", "log.txt", "report.md"):
        assert (run_dir / name).is_file(), name
    for stage in ("first", "second"):
        assert (run_dir / "stages" / stage / "DONE").is_file()
        assert json.loads((run_dir / "stages" / stage / "metrics.json").read_text())["kind"] == "toy"
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["stages"]["second"]["value"] == 1 + 1  # its own value + the upstream artifact
    info = json.loads((run_dir / "dataset.json").read_text())
    assert info["counts"] == {"users": 12, "items": 10, "interactions": 72}
    # leave-one-out: 12 users, one valid and one test interaction each
    assert info["split"]["valid"] == 12 and info["split"]["test"] == 12 and info["split"]["train"] == 48
    assert on_disk["stages"]["first"]["n_train"] == 48
    assert "toy stage ran" in (run_dir / "log.txt").read_text()
    assert "| first | toy |" in (run_dir / "report.md").read_text()


def test_failed_stage_resumes_without_rerunning_finished_ones(tmp_path, dataset_dir):
    run_dir = tmp_path / "run"
    with pytest.raises(RecalignError, match="on purpose"):
        run_recipe(recipe(dataset_dir, second={"teacher": "first", "fail": True}), run_dir, progress=False)
    assert CALLS == ["first", "second"]
    assert (run_dir / "stages" / "first" / "DONE").is_file()
    assert not (run_dir / "stages" / "second").exists()
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["first"]  # no half-done temp folder
    assert "failed" in (run_dir / "log.txt").read_text()

    CALLS.clear()
    summary = run_recipe(recipe(dataset_dir), run_dir, progress=False)
    assert CALLS == ["second"]
    assert set(summary["stages"]) == {"first", "second"}

    CALLS.clear()
    run_recipe(recipe(dataset_dir), run_dir, progress=False)
    assert CALLS == []  # everything finished with the same config: a no-op


def test_changed_config_reruns_that_stage_and_its_dependents(tmp_path, dataset_dir):
    run_dir = tmp_path / "run"
    run_recipe(recipe(dataset_dir), run_dir, progress=False)
    CALLS.clear()
    summary = run_recipe(recipe(dataset_dir, second={"teacher": "first", "value": 7}), run_dir, progress=False)
    assert CALLS == ["second"] and summary["stages"]["second"]["value"] == 8
    CALLS.clear()
    summary = run_recipe(recipe(dataset_dir, first={"value": 4}, second={"teacher": "first", "value": 7}),
                         run_dir, progress=False)
    assert CALLS == ["first", "second"] and summary["stages"]["second"]["value"] == 11


def test_independent_stage_is_not_rerun_when_another_changes(tmp_path, dataset_dir):
    run_dir = tmp_path / "run"
    run_recipe(recipe(dataset_dir, second={}), run_dir, progress=False)
    CALLS.clear()
    run_recipe(recipe(dataset_dir, first={"value": 2}, second={}), run_dir, progress=False)
    assert CALLS == ["first"]


def without_times(summary: dict) -> dict:
    """Stage metrics minus wall-clock times (the only thing allowed to differ between identical runs)."""
    return {name: {k: v for k, v in m.items() if not k.endswith("seconds")} for name, m in summary["stages"].items()}


def test_seed_makes_runs_repeatable(tmp_path, dataset_dir):
    first = run_recipe(recipe(dataset_dir), tmp_path / "a", progress=False)
    again = run_recipe(recipe(dataset_dir), tmp_path / "b", progress=False)
    assert without_times(first) == without_times(again)
    assert (tmp_path / "a" / "stages" / "first" / "metrics.json").read_text().split("stage_seconds")[0] == \
        (tmp_path / "b" / "stages" / "first" / "metrics.json").read_text().split("stage_seconds")[0]
    other = recipe(dataset_dir)
    other.seed = 6
    different = run_recipe(other, tmp_path / "c", progress=False)
    assert different["stages"]["first"]["draw"] != first["stages"]["first"]["draw"]


def test_missing_dataset_creates_no_run_folder(tmp_path):
    bad = recipe_from_dict({"name": "x", "data": {"path": str(tmp_path / "absent")},
                            "stages": [{"name": "s", "kind": "toy"}]})
    with pytest.raises(RecalignError, match="absent"):
        run_recipe(bad, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_unknown_or_later_dependency_is_an_error_naming_the_field(tmp_path, dataset_dir):
    with pytest.raises(RecalignError, match=r"stages\.second\.params\.teacher: no stage named 'nope'"):
        recipe(dataset_dir, second={"teacher": "nope"})
    with pytest.raises(RecalignError, match=r"stages\.first\.params\.teacher: stage 'second' does not run before"):
        recipe(dataset_dir, first={"teacher": "second"})
    assert not (tmp_path / "run").exists()


def teacher_recipe(data: dict, seed: int = 0):
    """The demo's stages (popularity, BPR-MF, SASRec) at toy sizes."""
    return recipe_from_dict({
        "name": "demo-tiny", "seed": seed, "data": data, "eval": {"ks": [5, 10]},
        "stages": [
            {"name": "pop", "kind": "teacher", "params": {"model": "popularity"}},
            {"name": "bprmf", "kind": "teacher", "params": {"model": "bprmf", "epochs": 2, "dim": 8}},
            {"name": "sasrec", "kind": "teacher",
             "params": {"model": "sasrec", "params": {"epochs": 2, "dim": 16, "blocks": 1, "max_len": 10}}},
        ]})


TINY_SYNTHETIC = {"source": "synthetic", "options": {"n_users": 40, "n_items": 30, "min_length": 4, "max_length": 8}}


def test_teacher_stages_same_seed_identical_metrics(tmp_path):
    first = run_recipe(teacher_recipe(TINY_SYNTHETIC), tmp_path / "a", progress=False)
    again = run_recipe(teacher_recipe(TINY_SYNTHETIC), tmp_path / "b", progress=False)
    assert set(first["stages"]) == {"pop", "bprmf", "sasrec"}
    assert without_times(first) == without_times(again)
    assert 0.0 <= first["stages"]["sasrec"]["hr@10"] <= 1.0 and first["stages"]["pop"]["n_users"] == 40
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["dataset"] == first["dataset"]
    # the saved teachers load back through the run context
    ctx = RunContext(run_dir=tmp_path / "a", stage_dir=tmp_path / "a" / "stages" / "x", dataset=None, split=None,
                     seed=0, progress=False, recipe=teacher_recipe(TINY_SYNTHETIC))
    bprmf = ctx.load_teacher("bprmf")
    assert type(bprmf).__name__ == "BPRMF" and bprmf.config.dim == 8  # flat stage settings reach the teacher
    assert (tmp_path / "a" / "stages" / "sasrec" / "model" / "teacher.json").is_file()


def test_sampled_protocol_saves_one_candidate_file_shared_by_stages(tmp_path):
    from recalign.data.sampling import load_candidates

    spec = teacher_recipe(TINY_SYNTHETIC).model_copy(deep=True)
    spec.eval.protocol, spec.eval.n_negatives = "sampled", 20
    stages = spec.stages[:2]
    spec.stages = stages[:1]
    run_recipe(spec, tmp_path / "run", progress=False)
    files = list((tmp_path / "run" / "candidates").glob("test-*-n20-seed0.pt"))
    assert len(files) == 1
    users, candidates, seed = load_candidates(files[0])
    assert seed == 0 and candidates.shape == (40, 21) and len(users) == 40
    before = files[0].stat().st_mtime_ns
    spec.stages = stages  # bprmf, added later to the same run folder, ranks the saved lists (no redraw)
    result = run_recipe(spec, tmp_path / "run", progress=False)
    assert files[0].stat().st_mtime_ns == before and result["stages"]["bprmf"]["protocol"] == "sampled"


def test_prepared_data_is_cached_and_changed_options_rerun(tmp_path):
    run_dir = tmp_path / "run"
    data = {"source": "synthetic", "options": {"n_users": 20, "n_items": 15, "min_length": 4, "max_length": 6}}
    spec = recipe_from_dict({"name": "c", "data": data, "stages": [{"name": "only", "kind": "toy"}]})
    first = run_recipe(spec, run_dir, progress=False)
    cached = (run_dir / "data" / "interactions.parquet").stat().st_mtime_ns
    CALLS.clear()
    run_recipe(spec, run_dir, progress=False)
    assert CALLS == [] and (run_dir / "data" / "interactions.parquet").stat().st_mtime_ns == cached
    changed = recipe_from_dict({"name": "c", "data": {**data, "options": {**data["options"], "seed": 1}},
                                "stages": [{"name": "only", "kind": "toy"}]})
    second = run_recipe(changed, run_dir, progress=False)
    assert CALLS == ["only"] and second["dataset"] != first["dataset"]
    assert json.loads((run_dir / "data" / "dataset.json").read_text())["fingerprint"] == second["dataset"]


def test_failure_before_any_stage_finished_leaves_no_folder(tmp_path, dataset_dir):
    with pytest.raises(RecalignError, match="on purpose"):
        run_recipe(recipe(dataset_dir, first={"fail": True}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---- issue 9: permissions follow the umask, atomic helpers, absolute data paths ------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_io_helpers_create_files_and_folders_with_the_umask(tmp_path, umask_022):
    from recalign import io

    assert io.umask() == 0o022 and io.file_mode() == 0o644 and io.dir_mode() == 0o755
    assert mode(io.write_atomic(tmp_path / "a" / "b.txt", "hi")) == 0o644
    assert mode(io.write_json(tmp_path / "c.json", {"x": np.int64(3), "t": torch.tensor([1.5])})) == 0o644
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 3, "t": 1.5}
    with io.atomic_folder(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("1")
    assert mode(tmp_path / "folder") == 0o755 and (tmp_path / "folder" / "inside.txt").read_text() == "1"
    os.umask(0o077)
    assert mode(io.write_atomic(tmp_path / "private.txt", "p")) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c.json", "folder", "private.txt"]  # no temp left


def test_atomic_helpers_leave_the_old_version_when_writing_fails(tmp_path):
    from recalign import io

    io.write_atomic(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_folder(tmp_path / "d") as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed")
    assert (tmp_path / "f.txt").read_text() == "old" and only_names(tmp_path / "d") == ["old.txt"]
    assert only_names(tmp_path) == ["d", "f.txt"]
    with io.atomic_folder(tmp_path / "d") as tmp:
        (tmp / "new.txt").write_text("new")
    assert only_names(tmp_path / "d") == ["new.txt"]


def only_names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_run_folder_files_follow_the_umask(tmp_path, dataset_dir, umask_022):
    run_dir = tmp_path / "run"
    run_recipe(recipe(dataset_dir), run_dir, progress=False)
    for name in ("config.yaml", "dataset.json", "metrics.json", "report.md", "log.txt",
                 "stages/first/metrics.json", "stages/first/DONE", "stages/second/artifact.txt"):
        assert mode(run_dir / name) == 0o644, name
    for name in ("", "stages", "stages/first", "stages/second"):
        assert mode(run_dir / name) == 0o755, name


def test_run_records_absolute_data_paths(tmp_path, dataset_dir, monkeypatch):
    monkeypatch.chdir(dataset_dir.parent)
    spec = recipe_from_dict({"name": "rel", "data": {"path": dataset_dir.name},
                             "stages": [{"name": "first", "kind": "toy"}]})
    run_recipe(spec, tmp_path / "run", progress=False)
    from recalign.recipes import load_recipe

    assert load_recipe(tmp_path / "run" / "config.yaml").data.path == str(dataset_dir.resolve())
    assert spec.data.path == dataset_dir.name  # the caller's recipe is not modified


def test_unwritable_run_folder_is_refused_before_any_work(tmp_path, dataset_dir):
    from recalign.errors import OutputError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*afile/run: .*afile is not a folder"):
        run_recipe(recipe(dataset_dir), tmp_path / "afile" / "run", progress=False)
    assert CALLS == []


def test_atomic_path_keeps_the_suffix_for_writers_that_add_one(tmp_path):
    from recalign import io

    with io.atomic_path(tmp_path / "emb.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path
        np.save(tmp, np.arange(3))
    assert np.load(tmp_path / "emb.npy").tolist() == [0, 1, 2] and only_names(tmp_path) == ["emb.npy"]
