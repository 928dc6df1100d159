"""SPRec's recipe stage: `run_sprec` in the stage's work folder, the comparison with SFT, tables and plot."""

from __future__ import annotations

import shutil
from typing import Literal

from pydantic import Field

from recalign.config import stage_params_model
from recalign.errors import ConfigError
from recalign.io import write_atomic, write_json
from recalign.methods.sprec.algorithm import (
    VARIANTS,
    SPRecConfig,
    _fingerprint,
    run_sprec,
)
from recalign.methods.sprec.report import (
    compare_against_sft,
    comparison_table,
    iteration_table,
    plot_iterations,
)
from recalign.stages import Stage

# ---- the recipe stage ---------------------------------------------------------------------------------------

SPRecStageConfig = stage_params_model(
    SPRecConfig, "SPRecStageConfig", doc="Params of a `sprec` recipe stage (cut-offs and users: the recipe's eval).",
    protocol=(Literal["recipe", "sprec_rows"], Field(
        "recipe", description="'recipe': every variant and iteration scored by the recipe's evaluator on its users "
                              "(comparable); 'sprec_rows': the paper's own rows and list metrics (a parity protocol)")))


def run_stage(ctx, params) -> dict:
    """Recipe stage "sprec": run the loop in a persistent work folder (resumable), then report into the stage."""
    from recalign.checkpoints import stable_hash
    from recalign.llm.answers import RecipeAnswers
    from recalign.llm.generate import SPRecGenerationConfig
    from recalign.llm.grounding import make_grounder
    from recalign.llm.tasks import SeqRecTask

    protocol = getattr(params, "protocol", "recipe")
    config = SPRecConfig(**params.model_dump(exclude={"protocol"}), ks=list(ctx.recipe.eval.ks),
                         eval_rows=ctx.recipe.eval.users)
    if ctx.split is None:
        raise ConfigError("the sprec stage needs a split")
    evaluator = None
    if protocol == "recipe":
        evaluator = RecipeAnswers(ctx, SeqRecTask(max_history=config.max_history),
                                  make_grounder(config.grounding, ctx.dataset.titles()),
                                  SPRecGenerationConfig(max_new_tokens=config.eval_generation.max_new_tokens),
                                  config.eval_generation.batch_size, part=config.eval_part, progress=ctx.progress,
                                  backend=config.backend)
    # The stage folder is rebuilt from scratch on every attempt; iterations live outside it so a kill resumes.
    key = stable_hash({"config": _fingerprint(config), "protocol": protocol,
                       "eval": ctx.recipe.eval.model_dump(mode="json", exclude={"table"}),
                       "data": ctx.dataset.fingerprint(), "split": ctx.recipe.split.model_dump(mode="json")})
    work = ctx.run_dir / "work" / f"{ctx.stage.name if ctx.stage else 'sprec'}-{key}"
    summary = run_sprec(config, ctx.dataset, ctx.split, work, progress=ctx.progress, log=ctx.log, evaluator=evaluator)
    write_json(ctx.stage_dir / "iterations.json", summary["iterations"])
    write_atomic(ctx.stage_dir / "iterations.md", iteration_table(summary))
    plot_iterations(summary, ctx.stage_dir / "ndcg_divratio.png")
    if config.compare_resamples > 0 and len(summary["iterations"]) > 1:
        first = summary["iterations"][0]
        keys = tuple(k for k in ("hr@5", "ndcg@5", "div_ratio@5", "or_ratio@5", "mgu@5", "dgu@5") if k in first)
        comparisons = compare_against_sft(config, ctx.dataset, ctx.split, work, keys=keys or ("hr@1",),
                                          n_resamples=config.compare_resamples, seed=config.seed,
                                          evaluator=evaluator)
        write_json(ctx.stage_dir / "comparison_vs_sft.json", comparisons)
        write_atomic(ctx.stage_dir / "comparison_vs_sft.md", comparison_table(comparisons))
    last = max(r["iteration"] for r in summary["iterations"])
    (ctx.stage_dir / "final").mkdir()
    for variant, record in summary["final"].items():
        source = work / "sft" if variant == "sft" else work / variant / f"iter_{record['iteration']}"
        shutil.copytree(source / "adapter", ctx.stage_dir / "final" / variant)
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


HEADLINE_KEYS = ("valid_ratio", "valid_title_rate", "n_users", "users_hash", "n_rows")


SPREC_STAGE = Stage(multi_process=True, params=SPRecStageConfig, run=run_stage,
                    description="SPRec: SFT, then self-play DPO with the model's own grounded answers as negatives; "
                                "baselines SFT and DPO with random negatives")
