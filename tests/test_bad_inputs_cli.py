"""Bad input at every CLI entry point and in recipes: exit code 2, one stderr line `recalign: error: ...`, and
nothing half-written (the workspace's files, folders, sizes and times are exactly as before the command).

Entry points covered: `run` (recipe YAML, overrides, --out), `data prepare`, `data stats`, `data sources`,
`teacher train`, `eval`, `report`, and click-level usage errors (unknown options/commands, missing arguments).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from recalign.cli import app
from recalign.recipes import recipe_from_dict
from recalign.data.dataset import build_dataset
from recalign.runs import run_recipe

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

torch.set_num_threads(1)
runner = CliRunner()

DATA = "data: {source: synthetic, options: {n_users: 20, n_items: 30, min_length: 5, max_length: 8}}\n"
STAGE = "stages:\n  - {name: pop, kind: teacher, params: {model: popularity}}\n"
GOOD = "name: good\n" + DATA + "eval: {ks: [5]}\n" + STAGE


def recipe(*lines: str, data: str = DATA, stages: str = STAGE) -> str:
    """A small recipe with extra top-level lines."""
    return "name: bad\n" + data + "".join(line + "\n" for line in lines) + stages


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """good.yaml, a prepared dataset `prepared/`, a finished run `run/` (popularity) and a plain file `afile`."""
    root = tmp_path_factory.mktemp("workspace")
    (root / "good.yaml").write_text(GOOD)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame([(f"u{u}", f"i{int(rng.integers(12))}", t) for u in range(8) for t in range(5)],
                         columns=["user", "item", "timestamp"])
    build_dataset(frame, name="tiny", source="test").save(root / "prepared")
    spec = recipe_from_dict({"name": "run", "data": {"path": str(root / "prepared")}, "eval": {"ks": [5]},
                             "stages": [{"name": "pop", "kind": "teacher", "params": {"model": "popularity"}}]})
    run_recipe(spec, root / "run", progress=False)
    (root / "afile").write_text("a file, not a folder\n")
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, size, mtime and mode."""
    result = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        result[str(path.relative_to(root))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns, stat.st_mode)
    return result


HUGE = "k" * 100_000

# (id, recipe text written to bad.yaml or None, command-line arguments, a fragment the error line must contain)
CASES = [
    # ---- recipe files
    ("yaml-syntax", "name: bad\ndata:\n  source: [synthetic\n", ["run", "bad.yaml"], "bad.yaml:"),
    ("yaml-tab-indent", "name: bad\n\tseed: 1\n", ["run", "bad.yaml"], "invalid YAML"),
    ("yaml-not-mapping", "- name\n- seed\n", ["run", "bad.yaml"], "YAML mapping"),
    ("yaml-empty", "", ["run", "bad.yaml"], "name: missing required key"),
    ("yaml-not-utf8", None, ["run", "latin1.yaml"], "not UTF-8"),
    ("missing-recipe", None, ["run", "nowhere.yaml"], "nowhere.yaml"),
    ("name-wrong-type", recipe("seed: 1").replace("name: bad", "name: [1, 2]"), ["run", "bad.yaml"], "name"),
    ("seed-wrong-type", recipe("seed: abc"), ["run", "bad.yaml"], "seed"),
    ("unknown-top-key", recipe("colour: red"), ["run", "bad.yaml"], "colour: unknown key"),
    ("unknown-data-key", recipe(data="data: {source: synthetic, colur: 1}\n"), ["run", "bad.yaml"],
     "data.colur: unknown key"),
    ("unknown-source-option", recipe(data="data: {source: synthetic, options: {n_user: 3}}\n"),
     ["run", "bad.yaml"], "data.options.n_user: unknown key"),
    ("unknown-source", recipe(data="data: {source: netflix}\n"), ["run", "bad.yaml"], "unknown source 'netflix'"),
    ("source-and-path", recipe(data="data: {source: synthetic, path: x}\n"), ["run", "bad.yaml"], "exactly one"),
    ("missing-dataset-folder", recipe(data="data: {path: no-such-folder}\n"), ["run", "bad.yaml"],
     "no-such-folder"),
    ("unknown-split-key", recipe("split: {kind: leave_one_out, ratio: 2}"), ["run", "bad.yaml"],
     "split.ratio: unknown key"),
    ("unknown-split-kind", recipe("split: {kind: sideways}"), ["run", "bad.yaml"], "split.kind"),
    ("bad-fractions", recipe("split: {kind: random, fractions: [0.5, 0.2]}"), ["run", "bad.yaml"], "sum to 1"),
    ("unknown-eval-key", recipe("eval: {ks: [5], colour: red}"), ["run", "bad.yaml"], "eval.colour: unknown key"),
    ("eval-ks-negative", GOOD, ["run", "bad.yaml", "eval.ks=[-1]"], "eval.ks"),
    ("eval-ks-not-list", GOOD, ["run", "bad.yaml", "eval.ks=ten"], "eval.ks"),
    ("n-negatives-negative", GOOD, ["run", "bad.yaml", "eval.n_negatives=-5"], "eval.n_negatives"),
    ("unknown-stage-key", recipe(stages="stages:\n  - {name: pop, kind: teacher, parms: {}}\n"),
     ["run", "bad.yaml"], "stages.pop.parms: unknown key"),
    ("unknown-stage-param", recipe(stages="stages:\n  - {name: b, kind: teacher, params: {model: bprmf, epoch: 3}}\n"),
     ["run", "bad.yaml"], "stages.b.params.epoch: unknown key"),
    ("epochs-negative", recipe(stages="stages:\n  - {name: b, kind: teacher, params: {model: bprmf}}\n"),
     ["run", "bad.yaml", "stages.b.params.epochs=-1"], "epochs"),
    ("unknown-stage-kind", recipe(stages="stages:\n  - {name: g, kind: gru4rec}\n"), ["run", "bad.yaml"],
     "unknown stage kind 'gru4rec'"),
    ("unknown-teacher", recipe(stages="stages:\n  - {name: g, kind: teacher, params: {model: gru4rec}}\n"),
     ["run", "bad.yaml"], "gru4rec"),
    ("no-stages", recipe(stages="stages: []\n"), ["run", "bad.yaml"], "at least one stage"),
    ("duplicate-stages", recipe(stages=STAGE + "  - {name: pop, kind: teacher, params: {model: popularity}}\n"),
     ["run", "bad.yaml"], "two stages are named 'pop'"),
    ("bad-stage-name", recipe(stages="stages:\n  - {name: ../up, kind: teacher, params: {model: popularity}}\n"),
     ["run", "bad.yaml"], "stage name"),
    # ---- run names (they name the run folder)
    ("name-escapes", GOOD, ["run", "bad.yaml", "name=../../x"], "plain folder name"),
    ("name-backslash", GOOD, ["run", "bad.yaml", "name=a\\b"], "plain folder name"),
    ("name-dotdot", GOOD, ["run", "bad.yaml", "name=.."], "must not start with '.'"),
    ("name-empty", GOOD, ["run", "bad.yaml", "name="], "must not be empty"),
    ("name-too-long", GOOD, ["run", "bad.yaml", "name=" + "n" * 101], "at most 100 characters"),
    ("name-control-char", GOOD, ["run", "bad.yaml", "name=a\x07b"], "control characters"),
    # ---- overrides
    ("override-no-equals", GOOD, ["run", "bad.yaml", "seed"], "key=value"),
    ("override-empty-key", GOOD, ["run", "bad.yaml", "=3"], "key=value"),
    ("override-unknown-stage", GOOD, ["run", "bad.yaml", "stages.nope.params.epochs=2"], "no stage named 'nope'"),
    ("override-whole-stage", GOOD, ["run", "bad.yaml", "stages.pop=3"], "cannot replace a whole stage"),
    ("override-huge-key", GOOD, ["run", "bad.yaml", HUGE + "=1"], "k" * 60 + "..."),
    ("override-not-mapping", GOOD, ["run", "bad.yaml", "name.x=1"], "'name' is not a mapping"),
    # ---- unwritable outputs
    ("run-out-under-file", None, ["run", "good.yaml", "--out", "afile/run"], "cannot write afile/run"),
    ("prepare-out-under-file", None, ["data", "prepare", "synthetic", "--out", "afile/d", "n_users=20"],
     "cannot write afile/d"),
    ("teacher-out-under-file", None, ["teacher", "train", "popularity", "--data", "prepared", "--out", "afile/t"],
     "cannot write afile/t"),
    ("run-out-name-too-long", None, ["run", "good.yaml", "--out", "o" * 5000], "File name too long"),
    ("prepare-out-name-too-long", None, ["data", "prepare", "synthetic", "--out", "o" * 5000], "cannot write"),
    ("recipe-path-too-long", None, ["run", "r" * 5000 + ".yaml"], "rrr..."),
    ("stats-path-too-long", None, ["data", "stats", "s" * 5000], "File name too long"),
    ("prepare-out-not-a-dataset", None, ["data", "prepare", "synthetic", "--out", "run"], "not a prepared dataset"),
    # ---- data commands
    ("prepare-unknown-source", None, ["data", "prepare", "netflix", "--out", "d"], "netflix"),
    ("prepare-missing-raw", None, ["data", "prepare", "movielens-100k", "--raw", "nowhere", "--out", "d"], "nowhere"),
    ("prepare-unknown-option", None, ["data", "prepare", "synthetic", "--out", "d", "n_user=3"], "n_user"),
    ("prepare-bad-option-value", None, ["data", "prepare", "synthetic", "--out", "d", "n_users=-4"], "n_users"),
    ("prepare-option-no-equals", None, ["data", "prepare", "synthetic", "--out", "d", "n_users"], "key=value"),
    ("stats-missing", None, ["data", "stats", "nowhere"], "nowhere"),
    ("sources-unknown", None, ["data", "sources", "netflix"], "unknown source 'netflix'"),
    # ---- teacher, eval, report
    ("teacher-missing-data", None, ["teacher", "train", "bprmf", "--data", "nowhere", "--out", "t"], "nowhere"),
    ("teacher-unknown-setting", None, ["teacher", "train", "bprmf", "--data", "prepared", "--out", "t", "epocs=3"],
     "epocs"),
    ("teacher-negative-epochs", None, ["teacher", "train", "bprmf", "--data", "prepared", "--out", "t", "epochs=-1"],
     "epochs"),
    ("teacher-unknown-model", None, ["teacher", "train", "gru4rec", "--data", "prepared", "--out", "t"], "gru4rec"),
    ("eval-bad-protocol", None, ["eval", "run", "--protocol", "nope"], "--protocol"),
    ("eval-bad-part", None, ["eval", "run", "--part", "train"], "--part"),
    ("eval-not-a-run", None, ["eval", "prepared"], "not a run folder"),
    ("report-unknown-column", None, ["report", "run", "--columns", "foo@3"], "unknown metric 'foo@3'"),
    ("report-unknown-k", None, ["report", "run", "--columns", "hr@5,hr@3"], "available: "),
    ("report-empty-columns", None, ["report", "run", "--columns", ","], "--columns"),
    ("report-missing-run", None, ["report", "nowhere"], "nowhere"),
    # ---- click-level usage errors
    ("unknown-option", None, ["run", "good.yaml", "--colour", "red"], "No such option: --colour"),
    ("unknown-command", None, ["frobnicate"], "No such command"),
    ("missing-argument", None, ["data", "prepare", "--out", "d"], "Missing argument"),
    ("missing-option-value", None, ["eval", "run", "--protocol"], "--protocol"),
    ("bad-int-option", None, ["teacher", "train", "bprmf", "--data", "prepared", "--out", "t", "--seed", "x"],
     "--seed"),
]


@pytest.mark.parametrize("recipe_text,args,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, monkeypatch, recipe_text, args, fragment):
    monkeypatch.chdir(workspace)
    for leftover in ("bad.yaml", "latin1.yaml"):
        (workspace / leftover).unlink(missing_ok=True)
    if recipe_text is not None:
        (workspace / "bad.yaml").write_text(recipe_text)
    (workspace / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    before = snapshot(workspace)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[:2000]
    assert lines[0].startswith("recalign: error: "), lines[0]
    assert fragment in lines[0], (fragment, lines[0][:500])
    assert len(lines[0]) < 1000, lines[0][:200]  # user input is echoed truncated, never in full
    assert snapshot(workspace) == before  # no run folder, no output folder, report.md untouched
    assert not (workspace / "runs").exists() and not (workspace.parent / "x").exists()


def test_there_are_enough_cases():
    assert len(CASES) >= 50
    assert len({c[0] for c in CASES}) == len(CASES)
