"""TrackRec's recipe stage (`TRACKREC_STAGE`), a thin adapter: CTR impressions from the run's dataset,
`run_trackrec` in a work folder of the run, and its iteration table (docs/systems/trackrec.md)."""

from __future__ import annotations

from pathlib import Path

from recalign.methods.trackrec.algorithm import (
    RESUMABLE_FIELDS,
    CtrRows,
    TitleCatalog,
    run_trackrec,
    teacher_name,
    verifier_base,
)
from recalign.methods.trackrec.config import TrackRecConfig, TrackRecStageConfig
from recalign.stages import Stage, fill_seeds

__all__ = ["TRACKREC_STAGE", "run_stage", "alternation_table"]


def run_stage(ctx, params: TrackRecStageConfig) -> dict:
    """Recipe stage "trackrec": impressions, the loop in a persistent work folder (resumable), report files."""
    from recalign.methods.trackrec.ctr.data import build_impressions, split_users

    params = fill_seeds(params, ctx.seed)
    config = params.trackrec_config()
    impressions = build_impressions(ctx.dataset, params.history_len, params.threshold)
    parts = split_users(impressions, params.split, params.seed)
    rows = CtrRows.of(impressions)
    work = _work_dir(ctx, params, config)
    ctx.log(f"teacher: {teacher_name(config.teacher)}")
    summary = run_trackrec(config, rows.take(parts["train"]), rows.take(parts["test"]),
                           TitleCatalog.of(ctx.dataset, params.noun), work, progress=ctx.progress, log=ctx.log)
    records = summary["iterations"]
    _write_reports(ctx, records, work)
    return _stage_metrics(config, records, work, ctx.stage.name if ctx.stage else "trackrec")


def _work_dir(ctx, params: TrackRecStageConfig, config: TrackRecConfig) -> Path:
    """The loop's work folder, keyed by everything it depends on but the iteration count (so it can grow)."""
    return ctx.work_folder({"config": config.model_dump(mode="json", exclude=RESUMABLE_FIELDS),
                            "data": ctx.dataset.fingerprint(),
                            "impressions": [params.history_len, params.threshold, params.split, params.noun]},
                           "trackrec")


def _write_reports(ctx, records: list[dict], work: Path) -> None:
    """iterations.json / .md, and G and its CoTs of iteration 0 ("first") and of the last iteration ("aligned")."""
    import shutil

    from recalign.io import write_atomic, write_json

    write_json(ctx.stage_dir / "iterations.json", records)
    write_atomic(ctx.stage_dir / "iterations.md", alternation_table(records))
    last = records[-1]
    for name, folder in (("first", work / "distill"), ("aligned", work / "align" / f"iter_{last['iteration']}")):
        shutil.copytree(folder / "generator", ctx.stage_dir / "final" / f"generator_{name}")
        shutil.copy2(folder / "cots.parquet", ctx.stage_dir / f"cots_{name}.parquet")


def _stage_metrics(config: TrackRecConfig, records: list[dict], work: Path, row: str = "trackrec") -> dict:
    """The stage's metrics: the last iteration's LLM test, and iteration 0's under `first/`."""
    last = records[-1]
    metrics = {"model": f"G {config.model}, V {verifier_base(config)}", "teacher": teacher_name(config.teacher),
               "iterations": last["iteration"], "work_dir": str(work)}
    metrics.update({k: last[k] for k in ("acc", "auc", "logloss", "valid_ratio", "n_test") if last.get(k) is not None})
    metrics.update({f"first/{k}": records[0][k] for k in ("acc", "auc", "logloss", "valid_ratio")
                    if records[0].get(k) is not None})
    claim = valid_ratio_claim(records[0], last, row)
    return {**metrics, **({"claims": [claim]} if claim else {})}


def valid_ratio_claim(first: dict, last: dict, row: str = "trackrec") -> dict | None:
    """The aligned V answers the LLM test with Yes/No (valid ratio) against iteration 0's V, with a 95% normal
    interval of the difference of the two proportions (each over the test impressions); None without both."""
    import math

    from recalign.eval.claims import measured_claim

    n = last.get("n_test") or first.get("n_test")
    a, b = last.get("valid_ratio"), first.get("valid_ratio")
    if not n or a is None or b is None or last is first:
        return None
    half = 1.96 * math.sqrt(max(a * (1 - a) + b * (1 - b), 1e-12) / n)
    found = {"a": a, "b": b, "diff": a - b, "low": a - b - half, "high": a - b + half}
    return measured_claim("TrackRec", f"the LLM test's valid ratio rises after {last['iteration']} alignment "
                          "iteration(s)", row, f"{row}:iteration 0", "valid_ratio", "higher", found)


def alternation_table(records: list[dict]) -> str:
    """Markdown: one row per iteration (0 = distilled G with the base V) of the LLM test and the preference data."""
    columns = ("acc", "auc", "logloss", "valid_ratio", "preferences", "dropped_all_wrong", "sdpo_loss_last")
    lines = ["| iteration | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for record in records:
        cells = [("" if record.get(c) is None else f"{record[c]:.4f}" if isinstance(record[c], float)
                  else str(record[c])) for c in columns]
        lines.append(f"| {record['iteration']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TRACKREC_STAGE = Stage(multi_process=True, params=TrackRecStageConfig, run=run_stage, reads=frozenset({"data", "seed"}),
                       description="TrackRec (LLM side): CoT distillation from a teacher (default: a STAND-IN "
                                   "summariser), then generator/validator alternating S-DPO; LLM test per iteration")
