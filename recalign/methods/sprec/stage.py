"""SPRec's recipe stage: `run_sprec` in the stage's work folder, the comparison with SFT, tables and plot.

A thin adapter: settings are `recalign.methods.sprec.config`, the loop `recalign.methods.sprec.algorithm`, the
tables, plot and statistics `recalign.methods.sprec.report` (docs/systems/sprec.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from recalign.errors import ConfigError
from recalign.io import write_atomic, write_json
from recalign.methods.sprec.algorithm import config_fingerprint, run_sprec
from recalign.methods.sprec.config import VARIANTS, SPRecConfig, SPRecStageConfig
from recalign.methods.sprec.report import (
    COMPARED_KEYS,
    compare_against_sft,
    comparison_table,
    iteration_table,
    plot_iterations,
)
from recalign.stages import Stage

__all__ = ["HEADLINE_KEYS", "SPREC_STAGE", "SPRecStageConfig", "run_stage"]

HEADLINE_KEYS = ("valid_ratio", "valid_title_rate", "n_users", "users_hash", "n_rows")


def run_stage(ctx, params) -> dict:
    """Recipe stage "sprec": run the loop in a persistent work folder (resumable), then report into the stage."""
    protocol = getattr(params, "protocol", "recipe")
    config = SPRecConfig(**params.model_dump(exclude={"protocol"}), ks=list(ctx.recipe.eval.ks),
                         eval_rows=ctx.recipe.eval.users)
    if ctx.split is None:
        raise ConfigError("the sprec stage needs a split")
    evaluator = _recipe_evaluator(ctx, config) if protocol == "recipe" else None
    work = _work_folder(ctx, config, protocol)
    summary = run_sprec(config, ctx.dataset, ctx.split, work, progress=ctx.progress, log=ctx.log, evaluator=evaluator)
    comparisons = _write_report(ctx, config, summary, work, evaluator)
    _copy_final_adapters(ctx, summary, work)
    return {**_stage_metrics(ctx, summary, protocol, work),
            **paper_claims(comparisons, ctx.stage.name if ctx.stage else "sprec")}


# SPRec's claim against its own SFT (paper §4): more diverse lists, fewer over-recommended items, accuracy kept.
CLAIMS = (("div_ratio", "higher", "DivRatio up against its SFT"),
          ("or_ratio", "lower", "ORRatio down against its SFT"),
          ("hr", "not_lower", "HR not significantly lower than its SFT"))


def paper_claims(comparisons: list[dict] | None, row: str = "sprec") -> dict:
    """{"claims": [...]} from the last SPRec iteration's comparison with SFT (empty without one): HR by its
    paired-bootstrap interval; DivRatio and ORRatio, set metrics a bootstrap would bias, by the paired permutation
    test (observed direction, p < 0.05)."""
    from recalign.eval.claims import SET_METRICS, measured_claim

    last = [c for c in comparisons or [] if c.get("variant") == "sprec"]
    if not last:
        return {}
    boot, perm = last[-1]["bootstrap"], last[-1].get("permutation") or {}
    claims = []
    for name, expect, text in CLAIMS:
        key = next((k for k in boot if k.split("@")[0] == name), None)
        found = (perm if name in SET_METRICS else boot).get(key) if key is not None else None
        if found is not None:
            claims.append(measured_claim("SPRec", f"{text} (iteration {last[-1]['iteration']})", row, f"{row}:sft",
                                         key, expect, found))
    return {"claims": claims}


def _recipe_evaluator(ctx, config: SPRecConfig):
    """Protocol `recipe`: every checkpoint answers for the recipe's users, scored by the recipe's evaluator."""
    from recalign.llm.answers import RecipeAnswers
    from recalign.llm.generate import GenerationConfig
    from recalign.llm.grounding import make_grounder
    from recalign.llm.tasks import SeqRecTask

    return RecipeAnswers(ctx, SeqRecTask(max_history=config.max_history),
                         make_grounder(config.grounding, ctx.dataset.titles()),
                         GenerationConfig(max_new_tokens=config.eval_generation.max_new_tokens),
                         config.eval_generation.batch_size, part=config.eval_part, progress=ctx.progress,
                         backend=config.backend)


def _work_folder(ctx, config: SPRecConfig, protocol: str) -> Path:
    """The loop's folder under the run, keyed by what its iterations depend on (a kill resumes there)."""
    return ctx.work_folder({"config": config_fingerprint(config), "protocol": protocol,
                            "eval": ctx.recipe.eval.hashed({"table"}),
                            "data": ctx.dataset.fingerprint(), "split": ctx.recipe.split.model_dump(mode="json")},
                           "sprec")


def _write_report(ctx, config: SPRecConfig, summary: dict, work: Path, evaluator) -> list[dict] | None:
    """iterations.json/.md, the NDCG/DivRatio plot and (with `compare_resamples`) the comparison with SFT."""
    write_json(ctx.stage_dir / "iterations.json", summary["iterations"])
    write_atomic(ctx.stage_dir / "iterations.md", iteration_table(summary))
    plot_iterations(summary, ctx.stage_dir / "ndcg_divratio.png")
    if config.compare_resamples > 0 and len(summary["iterations"]) > 1:
        first = summary["iterations"][0]
        keys = tuple(k for k in COMPARED_KEYS if k in first)
        comparisons = compare_against_sft(config, ctx.dataset, ctx.split, work, keys=keys or ("hr@1",),
                                          n_resamples=config.compare_resamples, seed=config.seed,
                                          evaluator=evaluator)
        write_json(ctx.stage_dir / "comparison_vs_sft.json", comparisons)
        write_atomic(ctx.stage_dir / "comparison_vs_sft.md", comparison_table(comparisons))
        return comparisons
    return None


def _copy_final_adapters(ctx, summary: dict, work: Path) -> None:
    """final/<variant>/: the adapter of each variant's last iteration."""
    (ctx.stage_dir / "final").mkdir()
    for variant, record in summary["final"].items():
        source = work / "sft" if variant == "sft" else work / variant / f"iter_{record['iteration']}"
        shutil.copytree(source / "adapter", ctx.stage_dir / "final" / variant)


def _stage_metrics(ctx, summary: dict, protocol: str, work: Path) -> dict:
    """Flat stage metrics: <variant>/<name> of each final record, and the headline variant's metrics unprefixed."""
    last = max(r["iteration"] for r in summary["iterations"])
    metrics: dict = {"protocol": "sprec_rows" if protocol == "sprec_rows" else ctx.recipe.eval.protocol,
                     "iterations": last, "work_dir": str(work)}
    for variant, record in summary["final"].items():
        for name, value in record.items():
            if name not in ("variant", "iteration") and isinstance(value, (int, float)):
                metrics[f"{variant}/{name}"] = value
    # The table row: the final iteration of the last variant run (sprec when it ran).
    headline = [v for v in VARIANTS if v in summary["final"]][-1]
    metrics["headline"] = headline
    metrics.update({k: v for k, v in summary["final"][headline].items()
                    if "@" in k or k in HEADLINE_KEYS})
    return metrics


SPREC_STAGE = Stage(multi_process=True, params=SPRecStageConfig, run=run_stage,
                    description="SPRec: SFT, then self-play DPO with the model's own grounded answers as negatives; "
                                "baselines SFT and DPO with random negatives")
