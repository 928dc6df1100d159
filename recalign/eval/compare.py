"""Compare runs: mean ± std of each row (stage) over runs (seeds), and a paired test between two rows.

The runs are run folders (their metrics.json) or sweep parents (`sweep.json`, written by `recalign run RECIPE
--seeds 0,1,2`, lists its seed folders). Runs are comparable only when each row was scored on the same users in
every run: the `users_hash` every stage records (see `RunContext.evaluate`) must agree, else `compare_runs` refuses.

Statistics, all over runs (one value per run and row):
- mean and sample standard deviation (ddof=1; "-" for a single run);
- between two rows A and B (`pair`): per run the difference A - B (the same run, so the same data, users and
  seed), Student's paired t-test over runs (`scipy.stats.ttest_rel`: the mean difference, its 95% confidence
  interval and the two-sided p-value) and the Wilcoxon signed-rank test's two-sided p-value
  (`scipy.stats.wilcoxon`, exact for few runs: with 3 runs it cannot go below 0.25).
The test is over runs rather than over users because stages keep aggregate metrics only (teacher stages save no
per-user result). For a paired test over the users of one run, see `recalign.eval.bootstrap`.
"""

from __future__ import annotations

import html
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from recalign.errors import ConfigError, RecalignError, quoted, shorten
from recalign.eval.report import check_columns, choose_columns, column_title, read_run_metrics, recipe_columns
from recalign.io import read_json, write_atomic

SWEEP_FILE = "sweep.json"  # in a sweep parent: {"recipe", "seeds", "runs": [{"seed", "folder"}]}
CONFIDENCE = 0.95


@dataclass
class ComparedRun:
    """One run folder: a short label, its seed and its stages' metrics."""

    label: str
    folder: Path
    seed: int | None
    stages: dict[str, dict]


@dataclass
class RowStats:
    """One metric of one row over the runs that report it."""

    values: list[float]
    mean: float | None
    std: float | None  # sample standard deviation (ddof=1); None for fewer than two runs

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class PairedDifference:
    """Row A minus row B on one metric, run by run, and the paired tests over runs."""

    metric: str
    labels: list[str]  # the runs that report the metric for both rows
    diffs: list[float]
    mean: float | None
    low: float | None  # 95% interval of the mean difference (paired t); None for fewer than two runs
    high: float | None
    p_value: float | None  # paired t-test, two-sided; None when undefined (one run, constant differences)
    p_wilcoxon: float | None


@dataclass
class RunComparison:
    """What `recalign compare` prints and writes."""

    runs: list[ComparedRun]
    rows: list[str]
    metrics: list[str]
    stats: dict[str, dict[str, RowStats]]  # row -> metric -> stats
    pair: tuple[str, str] | None = None
    paired: list[PairedDifference] = field(default_factory=list)


# ---- reading runs -------------------------------------------------------------------------------------

def sweep_folders(parent: str | os.PathLike) -> list[Path]:
    """The seed folders a sweep parent's sweep.json lists that hold a metrics.json (a killed sweep: the seeds
    that finished a stage)."""
    parent = Path(parent)
    try:
        sweep = read_json(parent / SWEEP_FILE)
        entries = [parent / str(entry["folder"]) for entry in sweep["runs"]]
    except (ValueError, KeyError, TypeError):
        raise RecalignError(f"{parent / SWEEP_FILE}: not a sweep summary (expected runs: [{{seed, folder}}])") \
            from None
    return [folder for folder in entries if (folder / "metrics.json").is_file()]


def expand_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """Run folders from run folders and sweep parents, in order, each once."""
    folders: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise RecalignError(f"{path}: no such run folder")
        if (path / SWEEP_FILE).is_file():
            found = sweep_folders(path)
            if not found:
                raise RecalignError(f"{path}: a sweep whose runs have no metrics.json yet")
        elif (path / "metrics.json").is_file():
            found = [path]
        else:
            raise RecalignError(f"{path}: neither a run folder (metrics.json) nor a sweep ({SWEEP_FILE})")
        folders += [f for f in found if f.resolve() not in {g.resolve() for g in folders}]
    return folders


def load_runs(paths: list[str | os.PathLike]) -> list[ComparedRun]:
    """Every run of `paths` with a label that tells it apart (its folder name, with its parent when needed)."""
    folders = expand_runs(paths)
    names = [f.name for f in folders]
    runs = []
    for folder in folders:
        label = folder.name if names.count(folder.name) == 1 else f"{folder.parent.name}/{folder.name}"
        summary = read_run_metrics(folder)
        seed = summary.get("seed")
        runs.append(ComparedRun(label=label, folder=folder, seed=seed if isinstance(seed, int) else None,
                                stages=dict(summary.get("stages") or {})))
    labels = [run.label for run in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = str(run.folder)
    return runs


# ---- choosing and checking ------------------------------------------------------------------------------

def known_rows(runs: list[ComparedRun]) -> list[str]:
    """Every stage of any run, in the order they first appear."""
    return list(dict.fromkeys(name for run in runs for name in run.stages))


def choose_rows(runs: list[ComparedRun], wanted: list[str] | None, option: str = "--rows") -> list[str]:
    """The requested rows (stage names), else all; an unknown one is an error listing the choices."""
    rows = known_rows(runs)
    if not wanted:
        return rows
    wanted = [w.strip() for w in wanted if w.strip()]
    unknown = [w for w in wanted if w not in rows]
    if unknown or not wanted:
        raise ConfigError(f"{option}: unknown row {quoted(unknown[0] if unknown else '')}; the runs have: "
                          f"{shorten(', '.join(rows) or '(no stage)', 2000)}")
    return list(dict.fromkeys(wanted))


def choose_metrics(runs: list[ComparedRun], rows: list[str], wanted: list[str] | None) -> list[str]:
    """The requested metrics (checked), else the first run's `eval.table`, else the default @10 columns."""
    stages = {f"{run.label}/{row}": run.stages[row] for run in runs for row in rows if row in run.stages}
    if wanted:
        return check_columns(stages, wanted, option="--metrics")
    present = {key for metrics in stages.values() for key in metrics}
    table = [c for c in recipe_columns(runs[0].folder) or [] if c in present]
    return table or choose_columns(stages)


def check_same_users(runs: list[ComparedRun], rows: list[str], pair: tuple[str, str] | None = None) -> None:
    """Refuse (RecalignError) rows scored on different users in different runs, or a pair scored on different
    users within a run; stages without a users_hash in every run (none recorded) are not checked."""
    for row in rows:
        seen = {run.label: run.stages[row].get("users_hash") for run in runs if row in run.stages}
        if len(set(seen.values())) > 1:
            (first, h1), (other, h2) = _two_different(seen)
            raise RecalignError(
                f"row {quoted(row)} was scored on different users in {first} (users_hash {h1}) and {other} "
                f"(users_hash {h2}); compare needs the same users in every run (eval.users draws its subset with "
                "the recipe seed: sweep with eval.users=null, or compare runs of one seed)")
    if pair is not None:
        for run in runs:
            a, b = (run.stages.get(name, {}).get("users_hash") for name in pair)
            if a is not None and b is not None and a != b:
                raise RecalignError(f"{run.label}: rows {quoted(pair[0])} and {quoted(pair[1])} were scored on "
                                    f"different users (users_hash {a} and {b}); a paired test needs the same users")


def _two_different(seen: dict[str, object]) -> tuple[tuple[str, object], tuple[str, object]]:
    items = list(seen.items())
    first = items[0]
    other = next(item for item in items if item[1] != first[1])
    return first, other


# ---- statistics ---------------------------------------------------------------------------------------------

def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def row_stats(values: list[float]) -> RowStats:
    """Mean and sample standard deviation (ddof=1) of one row's metric over runs."""
    if not values:
        return RowStats(values=[], mean=None, std=None)
    array = np.asarray(values, dtype=float)
    return RowStats(values=list(values), mean=float(array.mean()),
                    std=float(array.std(ddof=1)) if len(array) > 1 else None)


def paired_difference(metric: str, labels: list[str], a: list[float], b: list[float]) -> PairedDifference:
    """A - B run by run; the paired t-test (mean, 95% interval, p) and the Wilcoxon signed-rank p over runs."""
    from scipy import stats

    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    result = PairedDifference(metric=metric, labels=list(labels), diffs=[float(d) for d in diffs],
                              mean=float(diffs.mean()) if len(diffs) else None, low=None, high=None,
                              p_value=None, p_wilcoxon=None)
    if len(diffs) < 2:
        return result
    if np.allclose(diffs, diffs[0], rtol=0.0, atol=1e-12):  # constant differences: t is undefined
        result.low = result.high = float(diffs[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            test = stats.ttest_rel(a, b)
            interval = test.confidence_interval(CONFIDENCE)
        result.low, result.high, result.p_value = float(interval.low), float(interval.high), float(test.pvalue)
    if np.any(np.abs(diffs) > 1e-12):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result.p_wilcoxon = _number(float(stats.wilcoxon(diffs).pvalue))
    return result


def pair_differences(runs: list[ComparedRun], pair: tuple[str, str], metrics: list[str]) -> list[PairedDifference]:
    """One PairedDifference per metric, over the runs that report it for both rows."""
    results = []
    for metric in metrics:
        labels, a, b = [], [], []
        for run in runs:
            va, vb = (_number(run.stages.get(name, {}).get(metric)) for name in pair)
            if va is not None and vb is not None:
                labels.append(run.label)
                a.append(va)
                b.append(vb)
        results.append(paired_difference(metric, labels, a, b))
    return results


def compare_runs(paths: list[str | os.PathLike], rows: list[str] | None = None, metrics: list[str] | None = None,
                 pair: tuple[str, str] | None = None) -> RunComparison:
    """Read the runs, check they share users, and compute the per-row statistics and the paired test."""
    runs = load_runs(paths)
    chosen = choose_rows(runs, rows)
    if pair is not None:
        pair = tuple(choose_rows(runs, list(pair), option="--pair"))  # type: ignore[assignment]
        if len(pair) != 2:
            raise ConfigError("--pair: expected two different rows, e.g. --pair sasrec,bprmf")
    checked = list(dict.fromkeys([*chosen, *(pair or ())]))
    check_same_users(runs, checked, pair)
    columns = choose_metrics(runs, checked, metrics)
    stats = {row: {metric: row_stats([v for run in runs if row in run.stages
                                      for v in [_number(run.stages[row].get(metric))] if v is not None])
                   for metric in columns} for row in chosen}
    paired = pair_differences(runs, pair, columns) if pair is not None else []
    return RunComparison(runs=runs, rows=chosen, metrics=columns, stats=stats, pair=pair, paired=paired)


# ---- rendering ----------------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _p(value: float | None) -> str:
    return "-" if value is None else (f"{value:.3g}" if value >= 1e-4 else f"{value:.1e}")


def mean_std(stats: RowStats) -> str:
    """"0.1234 ± 0.0056" (or the mean alone for one run, "-" for none)."""
    if stats.mean is None:
        return "-"
    return _fmt(stats.mean) if stats.std is None else f"{stats.mean:.4f} ± {stats.std:.4f}"


def summary_rows(comparison: RunComparison) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the mean ± std table."""
    header = ["stage", "runs", *[column_title(m) for m in comparison.metrics]]
    rows = []
    for row in comparison.rows:
        n = max((s.n for s in comparison.stats[row].values()), default=0)
        rows.append([row, str(n), *[mean_std(comparison.stats[row][m]) for m in comparison.metrics]])
    return header, rows


def pair_rows(comparison: RunComparison) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired table: per metric, A - B per run, mean, 95% interval, p-values."""
    labels = [run.label for run in comparison.runs]
    header = ["metric", *labels, "mean diff", f"{CONFIDENCE:.0%} interval", "p (paired t)", "p (Wilcoxon)"]
    rows = []
    for diff in comparison.paired:
        per_run = dict(zip(diff.labels, diff.diffs))
        interval = "-" if diff.low is None else f"[{diff.low:+.4f}, {diff.high:+.4f}]"
        rows.append([column_title(diff.metric), *[_signed(per_run.get(label)) for label in labels],
                     _signed(diff.mean), interval, _p(diff.p_value), _p(diff.p_wilcoxon)])
    return header, rows


def titles(comparison: RunComparison) -> tuple[str, str]:
    """Titles of the two tables."""
    seeds = [run.seed for run in comparison.runs]
    runs = f"{len(comparison.runs)} run{'s' if len(seeds) != 1 else ''}" + (
        f" (seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))})" if None not in seeds else "")
    first = f"mean ± std (ddof=1) over {runs}"
    if comparison.pair is None:
        return first, ""
    a, b = comparison.pair
    return first, f"{a} - {b}, paired over runs (t-test: mean, {CONFIDENCE:.0%} interval, p; Wilcoxon p)"


def rich_tables(comparison: RunComparison) -> list[Table]:
    """The mean ± std table and, with a pair, the paired table."""
    tables = []
    for title, (header, rows) in zip(titles(comparison), (summary_rows(comparison), pair_rows(comparison))):
        if not title:
            continue
        table = Table(title=title)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right", style="bold" if i == 0 else None)
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    return tables


def comparison_html(comparison: RunComparison) -> str:
    """A self-contained HTML page (inline style, no script, no external resource) with the same tables."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>recalign compare</title>',
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #bbb;padding:.3em .6em;text-align:right}th:first-child,td:first-child"
             "{text-align:left}th{background:#eee}caption{font-weight:bold;text-align:left;padding:.3em 0}</style>",
             "</head><body>", "<h1>recalign compare</h1>", "<p>Runs: " + ", ".join(
                 f"<code>{html.escape(str(run.folder))}</code>" for run in comparison.runs) + "</p>"]
    for title, (header, rows) in zip(titles(comparison), (summary_rows(comparison), pair_rows(comparison))):
        if not title:
            continue
        parts.append(f"<table><caption>{html.escape(title)}</caption><thead><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_comparison_html(comparison: RunComparison, path: str | os.PathLike) -> Path:
    """Write `comparison_html` atomically to `path`."""
    path = Path(path)
    write_atomic(path, comparison_html(comparison))
    return path
