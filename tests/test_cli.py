"""The command line: every bad input gives exit 2, one line naming file/line/field, and no output folder."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pandas as pd
import pytest
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from recalign import stages
import recalign.methods as methods
from recalign.cli import app
from recalign.data.dataset import build_dataset

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2 and exactly one stderr line `recalign: error: ...` containing every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("recalign: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def only(folder) -> list[str]:
    """Names in a folder (to check nothing was left behind)."""
    return sorted(p.name for p in folder.iterdir())


# ---- bad raw data --------------------------------------------------------------------------------------

def test_garbled_movielens_line(tmp_path):
    raw = tmp_path / "ml"
    raw.mkdir()
    (raw / "u.data").write_text("1\t10\t4\t881250949\n2\t20\t5\t881250950\n3\tnot-a-number\t3\n")
    result = invoke("data", "prepare", "movielens-100k", "--raw", raw, "--out", tmp_path / "out")
    assert_one_line_error(result, "u.data:3")
    assert only(tmp_path) == ["ml"]


def test_goodreads_record_missing_field(tmp_path):
    raw = tmp_path / "goodreads"
    (raw / "data" / "Goodreads").mkdir(parents=True)
    (raw / "eval" / "Goodreads").mkdir(parents=True)
    titles = ["Book A", "Book B", "Book C"]
    (raw / "eval" / "Goodreads" / "id2name.json").write_text(json.dumps({str(i): t for i, t in enumerate(titles)}))
    (raw / "eval" / "Goodreads" / "name2id.json").write_text(json.dumps({t: i for i, t in enumerate(titles)}))
    (raw / "eval" / "Goodreads" / "name2genre.json").write_text(json.dumps({t: ["fiction"] for t in titles}))
    (raw / "eval" / "Goodreads" / "genre_dict.json").write_text(json.dumps({"fiction": 0}))
    good = {"instruction": "Recommend a book.",
            "input": 'The user has played the following books before: "Book A", "Book B", please write a new books',
            "output": '"Book C"\n'}
    bad = {"instruction": "Recommend a book.", "input": good["input"]}  # no "output"
    (raw / "data" / "Goodreads" / "train.json").write_text(json.dumps([good, bad], indent=1))
    result = invoke("data", "prepare", "goodreads-sprec", "--raw", raw, "--out", tmp_path / "out")
    assert_one_line_error(result, "train.json", "output")
    assert only(tmp_path) == ["goodreads"]


def test_amazon_review_missing_field(tmp_path):
    raw = tmp_path / "amazon"
    raw.mkdir()
    good = {"reviewerID": "U1", "asin": "B01", "overall": 5.0, "unixReviewTime": 1400000000}
    bad = {"reviewerID": "U2", "overall": 4.0, "unixReviewTime": 1400000100}  # no "asin"
    (raw / "Toys_5.json").write_text("\n".join(json.dumps(r) for r in (good, good | {"asin": "B02"}, bad)) + "\n")
    result = invoke("data", "prepare", "amazon2018", "--raw", raw, "--out", tmp_path / "out")
    assert_one_line_error(result, "Toys_5.json:3", "asin")
    assert only(tmp_path) == ["amazon"]


def test_unisrec_garbled_history_line(tmp_path):
    raw = tmp_path / "sci"
    raw.mkdir()
    (raw / "Scientific.text").write_text("item_id:token\ttext:token_seq\nA1\tA microscope. Lab.\nA2\tA lamp. Lab.\n")
    (raw / "Scientific.item2index").write_text("A1\t0\nA2\t1\n")
    (raw / "Scientific.user2index").write_text("U1\t0\nU2\t1\n")
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (raw / "Scientific.test.inter").write_text(header + "0\t0 1 0\t1\n1\t0 one\t1\n")
    result = invoke("data", "prepare", "unisrec", "--raw", raw, "--out", tmp_path / "out")
    assert_one_line_error(result, "Scientific.test.inter:3", "item_id_list")
    assert only(tmp_path) == ["sci"]


def test_pickle_referencing_a_callable_is_refused(tmp_path):
    raw = tmp_path / "steam"
    raw.mkdir()

    class Boom:  # pickles as a call to os.system; only written, never loaded unrestricted
        def __reduce__(self):
            import os
            return (os.system, ("echo should-never-run",))

    (raw / "test.pkl").write_bytes(pickle.dumps({1: [1, 2, 3], 2: Boom()}, protocol=4))
    assert b"system" in (raw / "test.pkl").read_bytes()
    result = invoke("data", "prepare", "recgpt-pickle", "--raw", raw, "--out", tmp_path / "out")
    line = assert_one_line_error(result, "test.pkl")
    assert "system" in line
    assert "should-never-run" not in result.output
    assert only(tmp_path) == ["steam"]


def test_unknown_source_lists_choices(tmp_path):
    result = invoke("data", "prepare", "netflix-prize", "--out", tmp_path / "out")
    assert_one_line_error(result, "netflix-prize", "movielens")
    assert only(tmp_path) == []


def test_nonexistent_paths(tmp_path):
    missing = tmp_path / "nowhere"
    assert_one_line_error(invoke("data", "prepare", "movielens-100k", "--raw", missing, "--out", tmp_path / "o"),
                          "nowhere")
    assert_one_line_error(invoke("data", "stats", missing), "nowhere")
    assert_one_line_error(invoke("run", missing / "recipe.yaml"), "recipe.yaml")
    assert_one_line_error(invoke("report", missing), "nowhere")
    assert_one_line_error(invoke("eval", missing), "nowhere")
    assert_one_line_error(invoke("teacher", "train", "bprmf", "--data", missing, "--out", tmp_path / "r"),
                          "nowhere")
    assert only(tmp_path) == []


# ---- bad recipes ----------------------------------------------------------------------------------------

def test_recipe_with_unknown_key_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("name: bad\ndata: {source: synthetic}\neval: {ks: [10], colour: red}\n")
    result = invoke("run", "r.yaml")
    assert_one_line_error(result, "r.yaml", "eval.colour", "unknown key")
    result = invoke("run", "r.yaml", "eval.colour=blue", "--out", tmp_path / "x")
    assert_one_line_error(result, "eval.colour")
    assert only(tmp_path) == ["r.yaml"]


def test_recipe_syntax_error_names_line(tmp_path):
    (tmp_path / "r.yaml").write_text("name: bad\ndata:\n  source: [synthetic\n")
    assert_one_line_error(invoke("run", tmp_path / "r.yaml", "--out", tmp_path / "run"), "r.yaml:")
    assert only(tmp_path) == ["r.yaml"]


def test_bad_override_key(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "name: ok\ndata: {source: synthetic}\nstages:\n  - {name: pop, kind: teacher, params: {model: popularity}}\n")
    assert_one_line_error(invoke("run", tmp_path / "r.yaml", "stages.sasrec.params.epochs=5", "--out",
                                 tmp_path / "run"), "no stage named 'sasrec'")
    assert_one_line_error(invoke("run", tmp_path / "r.yaml", "seed", "--out", tmp_path / "run"), "key=value")
    assert only(tmp_path) == ["r.yaml"]


# ---- working commands ----------------------------------------------------------------------------------

class EchoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score: float = 0.5


@pytest.fixture
def echo_stage(monkeypatch):
    module = types.ModuleType("recalign_test_cli_stages")
    module.ECHO = stages.Stage(params=EchoConfig, run=lambda ctx, p: {"hr@10": p.score, "ndcg@10": p.score / 2})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(methods.STAGE_KINDS, "echo", module.ECHO)


@pytest.fixture
def prepared(tmp_path):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame([(f"u{u}", f"i{int(rng.integers(15))}", t) for u in range(10) for t in range(5)],
                         columns=["user", "item", "timestamp"])
    return build_dataset(frame, name="tiny", source="test").save(tmp_path / "tiny")


def test_data_stats_json_and_table(prepared):
    result = invoke("data", "stats", prepared, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["users"] == 10 and stats["interactions"] == 50
    assert stats["sequence_length"]["median"] == 5
    result = invoke("data", "stats", prepared)
    assert result.exit_code == 0 and "interactions" in result.stdout and "50" in result.stdout


def test_run_report_and_overrides(tmp_path, prepared, echo_stage):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: echo\ndata: {{path: {prepared}}}\nstages:\n"
                      "  - {name: a, kind: echo}\n  - {name: b, kind: echo, params: {score: 0.25}}\n")
    run_dir = tmp_path / "run"
    result = invoke("run", recipe, "stages.a.params.score=0.75", "--out", run_dir, "--quiet")
    assert result.exit_code == 0, result.output
    assert "0.7500" in result.stdout and "0.2500" in result.stdout and "0.3750" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stages"]["a"]["hr@10"] == 0.75
    result = invoke("report", run_dir, "--columns", "ndcg@10")
    assert result.exit_code == 0 and "0.1250" in result.stdout and "0.7500" not in result.stdout
    assert "| b | echo | 0.1250 |" in (run_dir / "report.md").read_text()


def test_help_has_examples():
    for command in (["run"], ["data", "prepare"], ["data", "stats"], ["data", "download"], ["data", "sources"],
                    ["teacher", "train"],
                    ["eval"], ["report"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Example" in result.stdout, command


def test_teacher_train_then_eval(tmp_path, prepared):
    run_dir = tmp_path / "pop"
    result = invoke("teacher", "train", "popularity", "--data", prepared, "--out", run_dir, "--quiet")
    assert result.exit_code == 0, result.output
    assert (run_dir / "stages" / "popularity" / "model" / "teacher.json").is_file()
    trained = json.loads((run_dir / "metrics.json").read_text())["stages"]["popularity"]
    assert trained["n_users"] == 10
    result = invoke("eval", run_dir, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"{trained['hr@10']:.4f}" in result.stdout  # re-evaluating the saved model gives the same numbers
    assert_one_line_error(invoke("eval", run_dir, "--protocol", "nope"), "--protocol", "nope")
    assert_one_line_error(invoke("eval", run_dir, "--part", "train"), "--part")


def test_teacher_train_bad_setting_leaves_nothing(tmp_path, prepared):
    result = invoke("teacher", "train", "bprmf", "--data", prepared, "--out", tmp_path / "r", "epocs=3")
    assert_one_line_error(result, "epocs", "unknown key")
    result = invoke("teacher", "train", "gru4rec", "--data", prepared, "--out", tmp_path / "r")
    assert_one_line_error(result, "unknown teacher 'gru4rec'")
    assert not (tmp_path / "r").exists()


def test_download_unknown_name_and_bad_archive(tmp_path):
    import zipfile

    assert_one_line_error(invoke("data", "download", "netflix", "--out", tmp_path / "raw"), "netflix", "ml-100k")
    fake = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("ml-100k/u.data", "1\t1\t5\t874965758\n")
    result = invoke("data", "download", "ml-100k", "--out", tmp_path / "raw", "--from", fake)
    assert_one_line_error(result, "ml-100k.zip", "checksum mismatch")
    assert only(tmp_path) == ["ml-100k.zip"]


def test_data_sources_lists_options():
    result = invoke("data", "sources", "synthetic")
    assert result.exit_code == 0 and "n_users=1000" in result.stdout and "no raw files" in result.stdout
    assert_one_line_error(invoke("data", "sources", "netflix"), "unknown source 'netflix'")


def test_train_llm_sft_refuses_a_recipe_without_an_llm_sft_stage(tmp_path):
    from typer.testing import CliRunner

    from recalign.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ndata: {source: synthetic}\nstages:\n  - {name: pop, kind: teacher, params: {model: popularity}}\n")
    result = CliRunner().invoke(app, ["train", "llm-sft", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "no stage of kind 'llm-sft'" in result.output
    assert not (tmp_path / "run").exists()


# ---- issue 9: unwritable outputs, run names, eval from another folder, report columns ------------------------

def read_only_error(*args, **kwargs):
    import errno

    raise OSError(errno.EROFS, "Read-only file system", "somewhere/inside")


GOOD_RECIPE = ("name: ok\ndata: {source: synthetic, options: {n_users: 20, n_items: 30, min_length: 5, "
               "max_length: 8}}\neval: {ks: [5]}\nstages:\n  - {name: pop, kind: teacher, params: {model: popularity}}\n")


def test_read_only_output_is_one_line_for_run_prepare_and_teacher(tmp_path, prepared, monkeypatch):
    from recalign import io
    from recalign.data.dataset import Dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(GOOD_RECIPE)
    monkeypatch.setattr(io, "write_bytes_atomic", read_only_error)  # every atomic file write hits a read-only disk
    assert_one_line_error(invoke("run", "r.yaml", "--out", "run", "-q"), "cannot write run: Read-only file system")
    assert_one_line_error(invoke("teacher", "train", "popularity", "--data", prepared, "--out", "t", "-q"),
                          "cannot write t: Read-only file system")
    monkeypatch.setattr(Dataset, "save", read_only_error)
    assert_one_line_error(invoke("data", "prepare", "synthetic", "--out", "d", "n_users=20", "n_items=30",
                                 "min_length=5", "max_length=8"), "cannot write d: Read-only file system")
    assert only(tmp_path) == ["r.yaml", "tiny"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_folder(tmp_path, prepared):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (tmp_path / "r.yaml").write_text(GOOD_RECIPE)
        assert_one_line_error(invoke("run", tmp_path / "r.yaml", "--out", locked / "run"), "cannot write", "run")
        assert_one_line_error(invoke("data", "prepare", "synthetic", "--out", locked / "d"), "cannot write")
        assert_one_line_error(invoke("teacher", "train", "popularity", "--data", prepared, "--out", locked / "t"),
                              "cannot write")
        assert only(locked) == []
    finally:
        locked.chmod(0o755)


def test_output_under_a_file_is_refused_before_any_work(tmp_path, prepared):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "r.yaml").write_text(GOOD_RECIPE)
    for args in (["run", tmp_path / "r.yaml", "--out", tmp_path / "afile" / "run"],
                 ["data", "prepare", "synthetic", "--out", tmp_path / "afile" / "d"],
                 ["teacher", "train", "popularity", "--data", prepared, "--out", tmp_path / "afile" / "t"]):
        assert_one_line_error(invoke(*args), "cannot write", "afile is not a folder")
    assert only(tmp_path) == ["afile", "r.yaml", "tiny"]


def test_data_prepare_never_replaces_a_run_folder(tmp_path, prepared):
    run_dir = tmp_path / "pop"
    assert invoke("teacher", "train", "popularity", "--data", prepared, "--out", run_dir, "-q").exit_code == 0
    before = only(run_dir)
    assert_one_line_error(invoke("data", "prepare", "synthetic", "--out", run_dir), "not a prepared dataset")
    assert only(run_dir) == before and "config.yaml" in before
    # a prepared dataset folder is replaced, as before
    result = invoke("data", "prepare", "synthetic", "--out", prepared, "n_users=20", "n_items=30", "min_length=5",
                    "max_length=8")
    assert result.exit_code == 0, result.output


def test_run_name_cannot_leave_runs_folder(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    (work / "r.yaml").write_text(GOOD_RECIPE)
    assert_one_line_error(invoke("run", "r.yaml", "name=../../x"), "name:", "plain folder name")
    assert_one_line_error(invoke("run", "r.yaml", "name=" + "x" * 100_000), "name:", "at most 100 characters")
    assert only(tmp_path) == ["a"] and only(work) == ["r.yaml"]


def test_eval_does_not_depend_on_the_working_directory(tmp_path, prepared, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    prepared.rename(project / "data" / "tiny")
    (project / "r.yaml").write_text("name: rel\ndata: {path: data/tiny}\neval: {ks: [5]}\n"
                                    "stages:\n  - {name: pop, kind: teacher, params: {model: popularity}}\n")
    monkeypatch.chdir(project)
    result = invoke("run", "r.yaml", "--out", "runs/rel", "-q")
    assert result.exit_code == 0, result.output
    hr = json.loads((project / "runs" / "rel" / "metrics.json").read_text())["stages"]["pop"]["hr@5"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("eval", project / "runs" / "rel", "-q")
    assert result.exit_code == 0, result.output
    assert f"{hr:.4f}" in result.stdout
    assert only(elsewhere) == []


def test_report_with_unknown_column_lists_metrics_and_keeps_report(tmp_path, prepared):
    run_dir = tmp_path / "pop"
    assert invoke("teacher", "train", "popularity", "--data", prepared, "--out", run_dir, "-q").exit_code == 0
    report = (run_dir / "report.md").read_bytes()
    line = assert_one_line_error(invoke("report", run_dir, "--columns", "hr@10,foo@3"),
                                 "--columns: unknown metric 'foo@3'", "available: ", "hr@10", "ndcg@20")
    assert "foo@3" not in line.split("available:")[1]
    assert (run_dir / "report.md").read_bytes() == report
    result = invoke("report", run_dir, "--columns", "HR@10,ndcg@10")  # case does not matter
    assert result.exit_code == 0 and "| popularity | popularity |" in (run_dir / "report.md").read_text()


def test_unknown_option_is_one_line(tmp_path):
    assert_one_line_error(invoke("run", tmp_path / "r.yaml", "--colour", "red"), "No such option: --colour",
                          " run --help`")
    assert_one_line_error(invoke("data", "prepare"), "Missing argument")
    assert only(tmp_path) == []


def test_prepared_dataset_and_run_folder_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        (tmp_path / "r.yaml").write_text(GOOD_RECIPE)
        result = invoke("data", "prepare", "synthetic", "--out", tmp_path / "d", "n_users=20", "n_items=30",
                        "min_length=5", "max_length=8")
        assert result.exit_code == 0, result.output
        assert invoke("run", tmp_path / "r.yaml", "--out", tmp_path / "run", "-q").exit_code == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "d", tmp_path / "run", tmp_path / "run" / "data", tmp_path / "run" / "stages" / "pop"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
        for file in folder.iterdir():
            if file.is_file():
                assert file.stat().st_mode & 0o777 == 0o644, file
