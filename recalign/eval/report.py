"""Results tables (rich, Markdown) from the metrics.json files of run folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from recalign.errors import ConfigError, RecalignError, quoted, shorten
from recalign.io import read_json, write_atomic

DEFAULT_COLUMNS = ("hr@10", "ndcg@10", "recall@10", "mrr@10")
TIME_KEYS = ("train_seconds", "stage_seconds")


def read_run_metrics(run_dir: str | os.PathLike) -> dict:
    """The run's metrics.json: {"recipe", "dataset", "seed", "stages": {name: metrics}}."""
    path = Path(run_dir) / "metrics.json"
    if not Path(run_dir).is_dir():
        raise RecalignError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise RecalignError(f"{run_dir}: no metrics.json (has the run finished a stage?)")
    try:
        return read_json(path)
    except json.JSONDecodeError as exc:
        raise RecalignError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def choose_columns(stages: dict[str, dict], wanted: list[str] | None = None) -> list[str]:
    """Metric columns: the requested ones, else the default @10 metrics that at least one stage reports."""
    if wanted:
        return list(wanted)
    present = {key for metrics in stages.values() for key in metrics}
    columns = [c for c in DEFAULT_COLUMNS if c in present]
    if not columns:  # no @10: the same families at the largest K the stages report
        ks = {int(k) for key in present for name, _, k in [key.partition("@")] if k.isdigit()}
        families = [name for name, _, _ in (c.partition("@") for c in DEFAULT_COLUMNS)]
        for k in sorted(ks, reverse=True):
            columns = [f"{name}@{k}" for name in families if f"{name}@{k}" in present]
            if columns:
                break
    if not columns:
        columns = sorted(k for k in present if "@" in k)[:4]
    return columns


def available_metrics(stages: dict[str, dict]) -> list[str]:
    """The numeric metrics at least one stage reports (what a results table can show)."""
    return sorted({key for metrics in stages.values() for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)})


def check_columns(stages: dict[str, dict], wanted: list[str], option: str = "columns") -> list[str]:
    """The requested metric columns, matched case-insensitively; an unknown one is an error listing the choices."""
    wanted = [c.strip() for c in wanted if c.strip()]
    if not wanted:
        raise ConfigError(f"{option}: expected comma-separated metrics, e.g. hr@10,ndcg@10")
    known = {key.lower(): key for key in available_metrics(stages)}
    unknown = [c for c in wanted if c.lower() not in known]
    if unknown:
        raise ConfigError(f"{option}: unknown metric {quoted(unknown[0])}; available: "
                          f"{shorten(', '.join(known.values()) or '(none: no stage has metrics)', 2000)}")
    return [known[c.lower()] for c in wanted]


def stage_seconds(metrics: dict) -> float | None:
    """Training time when the stage reports it, else the stage's wall time."""
    for key in TIME_KEYS:
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


def _cell(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def column_title(metric: str) -> str:
    """Display name of a metric key: hr@10 -> HR@10, ndcg@10 -> NDCG@10, recall@10 -> Recall@10."""
    name, at, k = metric.partition("@")
    pretty = {"hr": "HR", "ndcg": "NDCG", "mrr": "MRR", "map": "MAP", "recall": "Recall",
              "precision": "Precision", "coverage": "Coverage"}.get(name, name)
    return pretty + at + k


def has_times(stages: dict[str, dict]) -> bool:
    """Whether any stage reports a time (else the time column is left out)."""
    return any(stage_seconds(m) is not None for m in stages.values())


def table_rows(stages: dict[str, dict], columns: list[str]) -> list[list[str]]:
    """One row per stage: name, model, the metric columns and (when any stage has one) the time."""
    rows = []
    with_time = has_times(stages)
    for name, metrics in stages.items():
        model = metrics.get("model") or metrics.get("teacher") or metrics.get("kind") or ""
        row = [name, str(model), *[_cell(metrics.get(c)) for c in columns]]
        if with_time:
            seconds = stage_seconds(metrics)
            row.append("-" if seconds is None else f"{seconds:.1f}")
        rows.append(row)
    return rows


RECIPE_PROTOCOLS = ("full", "sampled")  # the recipe evaluator's own (`eval.protocol`): every stage by default
PROTOCOLS = {"trd_temporal": "re-ranks candidate pools from its own temporal split (docs/metrics.md section 3)",
             "llm_generated": "generated titles grounded to catalog items, on sampled rows (docs/metrics.md section 2.4)",
             "sprec_rows": "one generated title, grounded to its K nearest catalog items, on its own rows "
                           "(docs/metrics.md section 2.3)"}


def protocol_note(stages: dict[str, dict]) -> str | None:
    """A warning naming the stages that explicitly asked for a parity protocol (their metrics.json `protocol` is
    not the recipe's full/sampled), so their numbers are not comparable with the other rows; None otherwise."""
    own = {name: m["protocol"] for name, m in stages.items()
           if isinstance(m.get("protocol"), str) and m["protocol"] not in RECIPE_PROTOCOLS}
    if not own:
        return None
    parts = [f"{name} ({protocol}: {PROTOCOLS.get(protocol, 'its own protocol')})" for name, protocol in own.items()]
    return ("Not comparable across rows: " + "; ".join(parts) + " asked for a parity protocol and are scored under "
            "their own protocol, the other stages under the recipe's evaluation.")


OTHER_TASK_KEYS = ("acc", "auc", "logloss", "valid_ratio")  # what a stage of another task (TrackRec's CTR) shows


def split_rows(stages: dict[str, dict], columns: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(stages shown as table rows, stages of another task): a stage with no value in any column but valid_ratio
    (TrackRec's CTR test in a ranking table) is listed under the table instead of as a row of dashes. When no stage
    has such a value, every stage is a row."""
    def ranked(metrics: dict) -> bool:
        return any(isinstance(metrics.get(c), (int, float)) for c in columns if c != "valid_ratio")

    rows = {name: m for name, m in stages.items() if ranked(m)}
    if not rows:
        return dict(stages), {}
    return rows, {name: m for name, m in stages.items() if name not in rows}


def other_task_note(others: dict[str, dict]) -> str | None:
    """One line naming the stages of another task and their own headline metrics; None when there are none."""
    if not others:
        return None
    parts = []
    for name, m in others.items():
        model = m.get("model") or m.get("teacher") or m.get("kind") or ""
        values = ", ".join(f"{k} {_cell(m[k])}" for k in OTHER_TASK_KEYS if isinstance(m.get(k), (int, float)))
        parts.append(f"{name} ({'; '.join(str(x) for x in (model, values) if x)})")
    return "Another task, not ranked in this table: " + "; ".join(parts) + "."


def results_table(summary: dict, columns: list[str] | None = None, title: str | None = None) -> Table:
    """A rich table: rows = stages, columns = metrics + train time (stages of another task: a line below)."""
    stages = summary.get("stages", {})
    columns = choose_columns(stages, columns)
    stages, others = split_rows(stages, columns)
    table = Table(title=title or f"{summary.get('recipe', 'run')} (dataset {summary.get('dataset', '?')})")
    table.add_column("stage", style="bold")
    table.add_column("model")
    for column in columns:
        table.add_column(column_title(column), justify="right")
    if has_times(stages):
        table.add_column("train s", justify="right")
    for row in table_rows(stages, columns):
        table.add_row(*row)
    notes = [n for n in (protocol_note(stages), other_task_note(others)) if n]
    table.caption = "\n".join(notes) if notes else None
    return table


def markdown_table(summary: dict, columns: list[str] | None = None) -> str:
    """The same table as GitHub Markdown."""
    stages = summary.get("stages", {})
    columns = choose_columns(stages, columns)
    stages, others = split_rows(stages, columns)
    header = ["stage", "model", *map(column_title, columns)] + (["train s"] if has_times(stages) else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(stages, columns)]
    note = other_task_note(others)
    return "\n".join(lines + (["", note] if note else []))


def collect_claims(summary: dict) -> list[dict]:
    """The claims a run's metrics carry: the recipe's (`claims`) and each stage's own `claims` list."""
    claims = [dict(c) for c in summary.get("claims") or [] if isinstance(c, dict)]
    for name, metrics in (summary.get("stages") or {}).items():
        entries = metrics.get("claims") if isinstance(metrics, dict) else None
        claims += [{"stage": name, **c} for c in entries or [] if isinstance(c, dict)]
    return claims


def claims_table(summary: dict) -> Table | None:
    """The claims as a rich table for the console (None when there are none)."""
    from recalign.eval.claims import COLUMNS, claim_cells

    claims = collect_claims(summary)
    if not claims:
        return None
    table = Table(title="claims (row - baseline: 95% paired-bootstrap interval, or permutation p for set metrics)")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("value", "baseline_value", "difference") else "left")
    for claim in claims:
        table.add_row(*claim_cells(claim))
    return table


def write_report(run_dir: str | os.PathLike, columns: list[str] | None = None) -> Path:
    """Write run_dir/report.md: what ran on which data, the results table, every metric per stage."""
    folder = Path(run_dir)
    summary = read_run_metrics(folder)
    if columns is None:
        columns = recipe_columns(folder)
    dataset = {}
    if (folder / "dataset.json").is_file():
        dataset = read_json(folder / "dataset.json")
    lines = [f"# Run `{summary.get('recipe', folder.name)}`", ""]
    if dataset:
        counts = dataset.get("counts", {})
        lines += [f"Dataset `{dataset.get('name')}` (source `{dataset.get('source')}`, fingerprint "
                  f"`{dataset.get('fingerprint')}`): {counts.get('users')} users, {counts.get('items')} items, "
                  f"{counts.get('interactions')} interactions; split `{dataset.get('split', {}).get('kind')}`; "
                  f"seed {summary.get('seed')}.", ""]
    note = protocol_note(summary.get("stages", {}))
    from recalign.eval.claims import claims_markdown

    claims = claims_markdown(collect_claims(summary))
    lines += ["## Results", "", markdown_table(summary, columns), ""] + ([note, ""] if note else [])
    lines += (["## Claims", "", "Each claim compares two rows on the same users: the difference with its 95% "
               "paired-bootstrap interval (set metrics such as DivRatio: a paired permutation test's p-value), and "
               "whether the claimed direction holds.", "", claims, ""]
              if claims else [])
    lines += [
              "The resolved recipe is `config.yaml`; per-stage artifacts are under `stages/<name>/`.", "",
              "## All metrics", ""]
    for name, metrics in summary.get("stages", {}).items():
        lines += [f"### {name}", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in metrics.items() if not isinstance(v, (dict, list))]
        lines.append("")
    from recalign.eval.curves import (
        plot_run_curves,  # training curves: curves.png beside each curves.jsonl
    )

    pngs = [png.relative_to(folder).as_posix() for png in plot_run_curves(folder)]
    lines += (["## Training curves", ""] + [f"![{png}]({png})" for png in pngs] + [""]) if pngs else []
    path = folder / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


def recipe_columns(folder: Path) -> list[str] | None:
    """The `eval.table` columns of the run's recipe, when it set them."""
    import yaml

    config = folder / "config.yaml"
    if not config.is_file():
        return None
    try:
        return (yaml.safe_load(config.read_text()) or {}).get("eval", {}).get("table")
    except yaml.YAMLError:
        return None
