"""TrackRec's recipe stage: CTR impressions from the run's dataset, `run_trackrec` in the stage's work
folder, and its iteration table."""

from __future__ import annotations

from pydantic import Field

from recalign.methods.trackrec.algorithm import (
    RESUMABLE_FIELDS,
    TitleCatalog,
    CtrRows,
    TrackRecConfig,
    _verifier_base,
    run_trackrec,
    teacher_name,
)
from recalign.stages import Stage, fill_seeds

# ---- the recipe stage ----------------------------------------------------------------------------------------------

class TrackRecStageConfig(TrackRecConfig):
    """Params of a "trackrec" stage: the loop's settings plus how impressions are built from the dataset."""

    history_len: int = Field(10, ge=1, description="items rated before the impression in its history")
    threshold: float = Field(4.0, description="label = rating >= threshold")
    split: list[float] = Field(default_factory=lambda: [0.8, 0.1, 0.1],
                               description="train/valid/test user fractions (seeded by `seed`)")
    noun: str = Field("movie", description="what the items are called in the prompts")


def run_stage(ctx, params: TrackRecStageConfig) -> dict:
    """Recipe stage "trackrec": impressions, the loop in a persistent work folder (resumable), report files."""
    import shutil

    from recalign.checkpoints import stable_hash
    from recalign.io import write_atomic, write_json
    from recalign.methods.trackrec.ctr.data import build_impressions, split_users

    params = fill_seeds(params, ctx.seed)
    config = TrackRecConfig(**params.model_dump(exclude={"history_len", "threshold", "split", "noun"}))
    impressions = build_impressions(ctx.dataset, params.history_len, params.threshold)
    parts = split_users(impressions, params.split, params.seed)
    rows = CtrRows.of(impressions)
    key = stable_hash({"config": config.model_dump(mode="json", exclude=RESUMABLE_FIELDS),
                       "data": ctx.dataset.fingerprint(), "impressions": [params.history_len, params.threshold,
                                                                          params.split, params.noun]})
    work = ctx.run_dir / "work" / f"{ctx.stage.name if ctx.stage else 'trackrec'}-{key}"
    ctx.log(f"teacher: {teacher_name(config.teacher)}")
    summary = run_trackrec(config, rows.take(parts["train"]), rows.take(parts["test"]),
                           TitleCatalog.of(ctx.dataset, params.noun), work, progress=ctx.progress, log=ctx.log)
    records = summary["iterations"]
    write_json(ctx.stage_dir / "iterations.json", records)
    write_atomic(ctx.stage_dir / "iterations.md", alternation_table(records))
    last = records[-1]
    for name, folder in (("first", work / "distill"), ("aligned", work / "align" / f"iter_{last['iteration']}")):
        shutil.copytree(folder / "generator", ctx.stage_dir / "final" / f"generator_{name}")
        shutil.copy2(folder / "cots.parquet", ctx.stage_dir / f"cots_{name}.parquet")
    metrics = {"model": f"G {config.model}, V {_verifier_base(config)}", "teacher": teacher_name(config.teacher),
               "iterations": last["iteration"], "work_dir": str(work)}
    metrics.update({k: last[k] for k in ("acc", "auc", "logloss", "valid_ratio", "n_test") if last.get(k) is not None})
    metrics.update({f"first/{k}": records[0][k] for k in ("acc", "auc", "logloss", "valid_ratio")
                    if records[0].get(k) is not None})
    return metrics


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
