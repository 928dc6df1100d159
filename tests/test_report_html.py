"""report.html: one self-contained page beside report.md (no network), a row per stage, inline PNGs that decode.

The plain-Python tests parse the page with html.parser and always run. The browser test renders it in headless
Chromium (when installed: `apt-get install chromium`), checks that the script sorted the table, that every image
decoded and that the console shows no error, and saves a screenshot (its path is printed; see `pytest -s`).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from recalign.eval.curves import write_curves
from recalign.eval.html_report import PNG_MAGIC, metric_interval, write_html_report

STAGES = {
    "popularity": {"kind": "teacher", "teacher": "popularity", "hr@10": 0.115, "ndcg@10": 0.0595,
                   "div_ratio@10": 0.012, "coverage@10": 0.08, "n_users": 200, "users_hash": "84e5",
                   "train_seconds": 0.01},
    "bprmf": {"kind": "teacher", "teacher": "bprmf", "hr@10": 0.21, "ndcg@10": 0.0965, "ndcg@10.low": 0.08,
              "ndcg@10.high": 0.11, "div_ratio@10": 0.1405, "n_users": 200, "users_hash": "84e5",
              "train_seconds": 2.1},
    "sasrec": {"kind": "teacher", "teacher": "sasrec", "hr@10": 0.59, "ndcg@10": 0.5304, "hr@10_std": 0.02,
               "div_ratio@10": 0.1305, "n_users": 200, "users_hash": "84e5", "train_seconds": 3.9},
    "x<b>&'\"": {"kind": "trackrec", "model": "<script>alert(1)</script>", "auc": 0.4, "stage_seconds": 8.0},
}


def make_run(folder: Path, claims: list[dict] | None = None) -> Path:
    """A finished run folder as `recalign run` leaves it: metrics.json, config.yaml, dataset.json, one curve."""
    (folder / "stages" / "bprmf").mkdir(parents=True)
    summary = {"recipe": "demo", "dataset": "fp", "seed": 0, "stages": STAGES}
    if claims is not None:
        summary["claims"] = claims
    (folder / "metrics.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"name": "demo", "eval": {"table": ["hr@10", "ndcg@10"]},
                                                        "stages": [{"name": "<bprmf>", "kind": "teacher"}]}))
    (folder / "dataset.json").write_text(json.dumps({"name": "synthetic", "source": "synthetic", "fingerprint": "fp",
                                                     "counts": {"users": 10, "items": 5, "interactions": 50},
                                                     "split": {"kind": "leave_one_out"}}))
    write_curves([{"epoch": e, "loss": 1.0 / e, "valid_metric": "recall@10", "valid_value": 0.1 * e, "seconds": 0.1}
                  for e in range(1, 5)], folder / "stages" / "bprmf" / "curves.jsonl")
    return folder


class Page(HTMLParser):
    """What the tests look at: the results table's rows, images, scripts, links and headings."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self.headings: list[str] = []
        self._where: list[str] = []
        self._table: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self._where.append(tag)
        if tag == "table":
            self._table = attrs.get("id")
        if tag == "tr" and self._table == "results" and "tbody" in self._where:
            self.rows.append([])
        if tag == "td" and self._table == "results" and "tbody" in self._where:
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        while self._where and self._where.pop() != tag:
            pass
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._where and self._where[-1] in ("h1", "h2"):
            self.headings.append(data.strip())
        if self._table == "results" and "td" in self._where and self.rows:
            self.rows[-1][-1] += data


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.mark.fast  # the quick loop: `make test-fast` (the browser tests start Chromium: not marked)
def test_report_html_is_self_contained_with_a_row_per_stage(tmp_path):
    run = make_run(tmp_path / "run")
    write_html_report(run)
    page = parse(run / "report.html")
    assert [row[0] for row in page.rows] == [name for name in STAGES if name != "x<b>&'\""]
    # the CTR stage has none of the table's columns: named under the table instead of a row of dashes
    assert "Another task, not ranked in this table: x&lt;b&gt;&amp;" in (run / "report.html").read_text()
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 2  # the scatter and bprmf's training curve
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, attrs)
        assert not (tag == "script" and "src" in attrs)
        assert not (tag == "link" and attrs.get("rel") == "stylesheet")
    text = (run / "report.html").read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # escaped
    assert "&lt;bprmf&gt;" in text  # config.yaml, escaped
    assert {"Results", "Accuracy against beyond-accuracy", "Training curves", "Settings"} <= set(page.headings)


@pytest.mark.fast
def test_results_table_has_the_recipe_columns_and_the_intervals(tmp_path):
    run = make_run(tmp_path / "run")
    write_html_report(run)
    page = parse(run / "report.html")
    heads = [attrs.get("data-key") for tag, attrs in page.tags if tag == "th" and attrs.get("data-key")]
    assert heads == ["stage", "model", "hr@10", "ndcg@10", "train_seconds"]
    rows = {row[0]: row for row in page.rows}
    assert rows["bprmf"][3] == "0.0965[0.0800, 0.1100]"  # value, then its interval
    assert rows["sasrec"][2] == "0.5900± 0.0200"
    assert "x<b>&'\"" not in rows  # another task's stage: a line under the table (see above)
    assert metric_interval({"m": 0.5, "m_ci": [0.4, 0.6]}, "m") == ("ci", 0.4, 0.6)
    assert metric_interval({"m": 0.5, "intervals": {"m": {"low": 0.3, "high": 0.7}}}, "m") == ("ci", 0.3, 0.7)
    assert metric_interval({"m": 0.5}, "m") is None


@pytest.mark.fast
def test_claims_section_only_when_the_metrics_carry_claims(tmp_path):
    write_html_report(make_run(tmp_path / "plain"))
    assert "Claims" not in parse(tmp_path / "plain" / "report.html").headings
    claims = [{"method": "sprec", "claim": "DivRatio up vs SFT", "diff": 0.0123, "interval": [0.001, 0.02],
               "holds": True}]
    write_html_report(make_run(tmp_path / "claims", claims))
    text = (tmp_path / "claims" / "report.html").read_text(encoding="utf-8")
    assert "Claims" in parse(tmp_path / "claims" / "report.html").headings
    assert "DivRatio up vs SFT" in text and "[0.0010, 0.0200]" in text and ">yes<" in text


@pytest.mark.fast
def test_recalign_report_writes_report_html(tmp_path):
    from recalign.cli import app

    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file() and (run / "report.md").is_file() and "report.html" in result.output
    assert [row[0] for row in parse(run / "report.html").rows] == [name for name in STAGES if name != "x<b>&'\""]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--virtual-time-budget=5000"]


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with its own profile folder (a shared one hands the page to another running instance)."""
    return subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    """Console messages of the page at error level, and uncaught exceptions, from Chromium's log."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line
            and ("ERROR" in line.split("CONSOLE")[0] or "Uncaught" in line or "rror" in line)]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "run")
    write_html_report(run)
    url = (run / "report.html").resolve().as_uri()
    dom = chromium(tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", url + "#sort=ndcg@10")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not console_errors(dom.stderr), console_errors(dom.stderr)
    page = Page()
    page.feed(dom.stdout)
    assert re.search(r'<html[^>]*class="js"', dom.stdout)  # the script ran
    assert [row[0] for row in page.rows][:3] == ["sasrec", "bprmf", "popularity"]  # sorted by NDCG@10, descending
    widths = [attrs.get("data-natural-width") for tag, attrs in page.tags if tag == "img"]
    assert len(widths) == 2 and all(w and int(w) > 100 for w in widths)  # every image decoded
    shot = tmp_path / "report_screenshot.png"
    done = chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert done.returncode == 0 and shot.read_bytes().startswith(PNG_MAGIC)
    print(f"screenshot: {shot}")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_console_check_sees_a_page_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    done = chromium(tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri())
    assert console_errors(done.stderr)
