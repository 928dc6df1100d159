"""`recalign compare` (mean ± std over runs, the paired test between two rows, HTML) against hand computations,
and `recalign run --seeds` (one run folder per seed, resumable, listed in sweep.json)."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import pytest
import yaml
from typer.testing import CliRunner

from recalign.cli import app
from recalign.eval.compare import SWEEP_FILE, compare_runs

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

runner = CliRunner()

# Three seeds of two rows; hand numbers below. hr@10 differences a - b: 0.10, 0.14, 0.06.
VALUES = {0: {"a": (0.30, 0.20), "b": (0.20, 0.15)},
          1: {"a": (0.35, 0.22), "b": (0.21, 0.16)},
          2: {"a": (0.28, 0.19), "b": (0.22, 0.12)}}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("recalign: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def fake_run(folder, seed: int, hashes: dict[str, str] | None = None) -> None:
    """A run folder holding only metrics.json, as `run_recipe` writes it."""
    hashes = hashes or {}
    stages = {row: {"kind": "teacher", "hr@10": hr, "ndcg@10": ndcg, "n_users": 50,
                    "users_hash": hashes.get(row, "84e522e8beaf81d8")} for row, (hr, ndcg) in VALUES[seed].items()}
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"recipe": "fake", "dataset": "x", "seed": seed,
                                                     "stages": stages}))


@pytest.fixture
def sweep(tmp_path):
    """A sweep parent with three fake seed runs."""
    parent = tmp_path / "sweep"
    for seed in VALUES:
        fake_run(parent / f"seed-{seed}", seed)
    (parent / SWEEP_FILE).write_text(json.dumps({"recipe": "fake", "seeds": [0, 1, 2], "runs": [
        {"seed": seed, "folder": f"seed-{seed}"} for seed in VALUES]}))
    return parent


def hand_t_test_df2(diffs: list[float]) -> tuple[float, float, float, float]:
    """Mean, 95% interval and two-sided p of the one-sample t-test of 3 numbers, in closed form for 2 degrees of
    freedom (CDF of t with df=2: 1/2 + t / (2 sqrt(t^2 + 2)))."""
    n = len(diffs)
    assert n == 3
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    t = mean / se
    p = 1 - abs(t) / math.sqrt(t * t + 2)
    q = 0.95  # |T| <= c with probability 0.95: c / sqrt(c^2 + 2) = 0.95
    c = math.sqrt(2 * q * q / (1 - q * q))
    return mean, mean - c * se, mean + c * se, p


def test_mean_std_and_paired_test_match_a_hand_computation(sweep):
    comparison = compare_runs([sweep], metrics=["hr@10", "ndcg@10"], pair=("a", "b"))
    assert [run.label for run in comparison.runs] == ["seed-0", "seed-1", "seed-2"]
    for row in ("a", "b"):
        for j, metric in enumerate(("hr@10", "ndcg@10")):
            values = [VALUES[seed][row][j] for seed in VALUES]
            mean = sum(values) / 3
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # sample std, ddof=1
            stats = comparison.stats[row][metric]
            assert stats.n == 3
            assert stats.mean == pytest.approx(mean, abs=1e-12)
            assert stats.std == pytest.approx(std, abs=1e-12)
    hr = comparison.paired[0]
    assert hr.metric == "hr@10" and hr.labels == ["seed-0", "seed-1", "seed-2"]
    assert hr.diffs == pytest.approx([0.10, 0.14, 0.06], abs=1e-12)
    mean, low, high, p = hand_t_test_df2([0.10, 0.14, 0.06])
    assert (mean, round(p, 5)) == (pytest.approx(0.10), 0.04941)  # t = 0.10 / (0.04 / sqrt 3) = 4.330
    assert (hr.mean, hr.low, hr.high, hr.p_value) == pytest.approx((mean, low, high, p), abs=1e-9)
    assert hr.p_wilcoxon == pytest.approx(0.25)  # exact: 3 positive differences, 2 of 2^3 sign patterns as extreme
    ndcg = comparison.paired[1]
    diffs = [VALUES[s]["a"][1] - VALUES[s]["b"][1] for s in VALUES]
    assert ndcg.diffs == pytest.approx(diffs)
    assert (ndcg.mean, ndcg.low, ndcg.high, ndcg.p_value) == pytest.approx(hand_t_test_df2(diffs), abs=1e-9)


def test_compare_command_prints_the_tables_and_writes_html(sweep, tmp_path):
    page = tmp_path / "compare.html"
    result = invoke("compare", sweep, "--metrics", "hr@10,ndcg@10", "--pair", "a,b", "--html", page)
    assert result.exit_code == 0, result.output
    assert "0.3100 ± 0.0361" in result.stdout  # row a, hr@10: mean 0.31, sample std sqrt(0.0026 / 2)
    assert "0.1000" in result.stdout and "0.0494" in result.stdout  # mean difference and paired-t p
    cells: list[str] = []

    class Cells(HTMLParser):
        def handle_starttag(self, tag, attrs):
            assert tag not in ("script", "img", "link"), tag

        def handle_data(self, data):
            cells.append(data)

    text = page.read_text()
    Cells().feed(text)
    assert "0.3100 ± 0.0361" in cells and "[+0.0006, +0.1994]" in cells
    assert "http://" not in text and "https://" not in text
    # the same runs named one by one, a row subset
    result = invoke("compare", *[sweep / f"seed-{s}" for s in VALUES], "--rows", "b", "--metrics", "hr@10")
    assert result.exit_code == 0, result.output
    assert "0.2100 ± 0.0100" in result.stdout


def test_runs_scored_on_different_users_are_refused(tmp_path):
    fake_run(tmp_path / "r0", 0)
    fake_run(tmp_path / "r1", 1, hashes={"a": "0000000000000000"})
    assert_one_line_error(invoke("compare", tmp_path / "r0", tmp_path / "r1"), "row 'a'", "different users",
                          "0000000000000000")
    fake_run(tmp_path / "r2", 2, hashes={"b": "1111111111111111"})  # within one run: a and b differ
    assert_one_line_error(invoke("compare", tmp_path / "r2", "--rows", "a", "--pair", "a,b"), "different users")
    assert_one_line_error(invoke("compare", tmp_path / "r0", "--pair", "a,zzz"), "--pair", "zzz")
    assert_one_line_error(invoke("compare", tmp_path / "r0", "--metrics", "nope@3"), "--metrics", "nope@3")
    assert_one_line_error(invoke("compare", tmp_path / "missing"), "no such run folder")


TINY_RECIPE = """name: tiny
data: {source: synthetic, options: {n_users: 40, n_items: 30, min_length: 5, max_length: 8}}
eval: {ks: [5, 10]}
stages:
  - {name: popularity, kind: teacher, params: {model: popularity}}
  - {name: bprmf, kind: teacher, params: {model: bprmf, dim: 8, epochs: 2, batch_size: 256}}
"""


def test_seed_sweep_makes_one_run_per_seed_and_resumes(tmp_path):
    recipe, parent = tmp_path / "tiny.yaml", tmp_path / "sweep"
    recipe.write_text(TINY_RECIPE)
    result = invoke("run", recipe, "--seeds", "0", "--out", parent, "-q")  # a sweep killed after seed 0
    assert result.exit_code == 0, result.output
    result = invoke("run", recipe, "--seeds", "0,1", "--out", parent, "-q")
    assert result.exit_code == 0, result.output
    assert "[seed 1] 2/2" in result.stderr and "mean ± std" in result.stdout
    sweep = json.loads((parent / SWEEP_FILE).read_text())
    assert sweep["seeds"] == [0, 1] and [r["folder"] for r in sweep["runs"]] == ["seed-0", "seed-1"]
    for seed in (0, 1):
        config = yaml.safe_load((parent / f"seed-{seed}" / "config.yaml").read_text())
        assert config["seed"] == seed and config["stages"][1]["params"]["seed"] == seed
        assert json.loads((parent / f"seed-{seed}" / "metrics.json").read_text())["seed"] == seed
    assert "bprmf] finished earlier with the same config: skipped" in (parent / "seed-0" / "log.txt").read_text()
    markers = {p: p.stat().st_mtime_ns for p in parent.glob("seed-*/stages/*/DONE")}
    metrics = {p: p.read_text() for p in parent.glob("seed-*/stages/*/metrics.json")}
    assert len(markers) == 4
    result = invoke("run", recipe, "--seeds", "0,1", "--out", parent, "-q")  # finished: nothing runs again
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in parent.glob("seed-*/stages/*/DONE")} == markers
    assert {p: p.read_text() for p in parent.glob("seed-*/stages/*/metrics.json")} == metrics
    result = invoke("compare", parent, "--pair", "bprmf,popularity")
    assert result.exit_code == 0, result.output
    assert "seed-0" in result.stdout and "seed-1" in result.stdout
    assert_one_line_error(invoke("run", recipe, "--seeds", "0,x", "--out", parent), "--seeds")
    assert_one_line_error(invoke("run", recipe, "--seeds", "0", "--out", parent / "seed-0"), "run folder")


def test_a_sweep_scores_every_seed_on_the_same_eval_users_subset(tmp_path):
    """With `eval.users: N` the subset is drawn with the recipe's own seed in every run of a sweep
    (`eval.users_seed`), so the runs are comparable; a plain run keeps drawing it with its seed."""
    recipe, parent = tmp_path / "tiny.yaml", tmp_path / "sweep"
    recipe.write_text(TINY_RECIPE.replace("eval: {ks: [5, 10]}", "eval: {ks: [5, 10], users: 7}")
                      .replace("  - {name: bprmf, kind: teacher, params: {model: bprmf, dim: 8, epochs: 2, "
                               "batch_size: 256}}\n", ""))
    result = invoke("run", recipe, "--seeds", "0,1,2", "--out", parent, "-q")
    assert result.exit_code == 0, result.output
    hashes = {json.loads((parent / f"seed-{s}" / "metrics.json").read_text())["stages"]["popularity"]["users_hash"]
              for s in (0, 1, 2)}
    assert len(hashes) == 1 and "mean ± std" in result.stdout
    for seed in (1, 2):  # the same recipe run alone with another seed draws another subset
        alone = invoke("run", recipe, f"seed={seed}", "--out", tmp_path / f"alone-{seed}", "-q")
        assert alone.exit_code == 0, alone.output
        metrics = json.loads((tmp_path / f"alone-{seed}" / "metrics.json").read_text())
        assert metrics["stages"]["popularity"]["users_hash"] not in hashes
