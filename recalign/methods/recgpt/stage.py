"""RecGPT's recipe stage: a thin adapter from a run folder to `run_recgpt` (algorithm.py) and back to a metrics
dict. The stage pre-trains on the recipe's `datasets.pretrain`, scores zero-shot (and fine-tuned) on its `data`
with the recipe's list evaluator, and writes results.json and the target's codes into its folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from recalign.checkpoints import stable_hash
from recalign.data.dataset import Dataset
from recalign.errors import ConfigError
from recalign.eval.curves import write_curves
from recalign.io import write_json
from recalign.methods.recgpt.algorithm import RecGPTResult, run_recgpt
from recalign.methods.recgpt.config import RecGPTConfig
from recalign.stages import Stage

if TYPE_CHECKING:
    from recalign.stages import RunContext

# ---- the recipe stage ------------------------------------------------------------------------------------------

def _accuracy(metrics: dict) -> dict:
    """The accuracy keys of an evaluator result (hr/ndcg/recall/mrr/precision/map @K)."""
    return {k: v for k, v in metrics.items() if "@" in k and k.split("@")[0] in
            ("hr", "ndcg", "recall", "mrr", "precision", "map")}


def work_folder(ctx: "RunContext", params: RecGPTConfig, pretrain: Sequence[Dataset], seed: int
                ) -> tuple[Path, str]:
    """The stage's work folder outside the stage folder (run/work/<stage>-<key>) and its key, a hash of what the
    result depends on: params, datasets, split, evaluation protocol and seed."""
    depends_on = {"params": params.fingerprint_dump(), "pretrain": [d.fingerprint() for d in pretrain],
                  "data": ctx.dataset.fingerprint(), "split": ctx.recipe.split.model_dump(mode="json"),
                  "eval": ctx.recipe.eval.hashed({"table"}), "seed": seed}
    return ctx.work_folder(depends_on, "recgpt"), stable_hash(depends_on)


def _other_accuracy(shown: dict, other: dict | None, history: Sequence[str], other_name: str) -> dict:
    """Accuracy of the shown decoder's non-headline history modes (`history_<mode>_*`) and of the other decoder
    (`<other_name>_*`, `<other_name>_history_<mode>_*`)."""
    metrics = {}
    for mode in history[1:]:
        metrics.update({f"history_{mode}_{k}": v for k, v in _accuracy(shown[mode]).items()})
    if other is not None:
        for mode in history:
            prefix = f"{other_name}_" if mode == history[0] else f"{other_name}_history_{mode}_"
            metrics.update({prefix + k: v for k, v in _accuracy(other[mode]).items()})
    return metrics


def stage_metrics(result: RecGPTResult, params: RecGPTConfig, work: Path) -> dict:
    """The stage's metrics: the headline history mode's result of the decoder the recipe trained last (fine-tuned
    when there is fine-tuning, else zero-shot or in-domain), codes and data sizes, then the accuracy of the other
    modes (`history_<mode>_*`) and, with fine-tuning, of the zero-shot decoder beside it (`zeroshot_*`). With
    `beam.mode` other than "beam", `inference` names the lists' source; with "both", the exact lists' metrics
    follow under the same names prefixed `exact.` (the headline's list metrics, the other modes' accuracy;
    `exact_differences` subtracts the beam's)."""
    tuned = result.finetuned is not None
    shown, other = (result.finetuned, result.zero_shot) if tuned else (result.zero_shot, None)
    headline = params.history[0]
    metrics = dict(shown[headline])
    metrics.update({"variant": "fine-tuned" if tuned else "zero-shot", "history": headline,
                    "collision_rate": result.target.codes.collision_rate,
                    "disambiguation_size": result.target.codes.sizes[-1], "work_dir": str(work)})
    if result.protocol == "in_domain":
        record = result.in_domain
        metrics.update({"variant": "in-domain", "best_epoch": record["best_epoch"], "epochs": record["epochs"],
                        f"valid_{record['valid_metric']}": record["best_valid"],
                        "train_seconds_per_epoch": record["train_seconds"] / max(record["epochs"], 1)})
    else:
        metrics.update({"pretrain_collision_rate": float(np.mean([c.codes.collision_rate
                                                                  for c in result.pretrain_catalogs])),
                        "pretrain_sequences": result.pretrain_sequences})
    metrics.update(_other_accuracy(shown, other, params.history, "zeroshot"))
    if params.beam.mode != "beam":
        metrics["inference"] = params.beam.mode
    if result.zero_shot_exact is not None:
        shown, other = ((result.finetuned_exact, result.zero_shot_exact) if tuned
                        else (result.zero_shot_exact, None))
        exact = {**{k: v for k, v in shown[headline].items() if "@" in k or k == "valid_ratio"},  # every list metric
                 **_other_accuracy(shown, other, params.history, "zeroshot")}
        metrics.update({f"exact.{k}": v for k, v in exact.items()})
    return metrics


def exact_differences(metrics: dict) -> dict:
    """Exact minus beam for every metric reported both ways (`exact.<name>` and `<name>`, beam.mode "both")."""
    return {k[len("exact."):]: v - metrics[k[len("exact."):]] for k, v in metrics.items()
            if k.startswith("exact.") and k[len("exact."):] in metrics}


def run_stage(ctx: "RunContext", params: RecGPTConfig) -> dict:
    """Stage "recgpt": `run_recgpt` on `datasets.pretrain` and the recipe's data, scored by its list evaluator."""
    if ctx.split is None:
        raise ConfigError("the recgpt stage needs a split")
    seed = int(params.seed if params.seed is not None else ctx.seed)
    pretrain = ctx.datasets("pretrain") if params.protocol == "zero_shot" else []
    work, key = work_folder(ctx, params, pretrain, seed)
    started = time.perf_counter()
    n_valid = params.in_domain.valid_users
    result = run_recgpt(params, ctx.dataset, pretrain, work,
                        evaluate=lambda model, excluded: ctx.evaluate(model, exclude_history=excluded),
                        train_interactions=ctx.split.train, seed=seed, fingerprint=key, progress=ctx.progress,
                        log=ctx.log, validate=lambda model, excluded: ctx.evaluate(
                            model, part="valid", n_users=n_valid, exclude_history=excluded, progress=False))
    metrics = stage_metrics(result, params, work)
    results = {"zero_shot": result.zero_shot, "finetuned": result.finetuned, "records": result.records}
    if result.zero_shot_exact is not None:
        results.update({"zero_shot_exact": result.zero_shot_exact, "finetuned_exact": result.finetuned_exact})
    if result.in_domain is not None:
        results["in_domain"] = result.in_domain
        write_curves(result.in_domain["curve"], ctx.stage_dir / "curves.jsonl")
    write_json(ctx.stage_dir / "results.json", results)
    result.target.codes.save(ctx.stage_dir / "codes.safetensors")
    ctx.log(f"recgpt done in {time.perf_counter() - started:.0f}s")
    return metrics


RECGPT_STAGE = Stage(params=RecGPTConfig, run=run_stage,
                     reads=frozenset({"data", "split", "eval", "seed", "datasets"}),
                     description="RecGPT: FSQ (or RQ-KMeans) item codes from text + a GPT decoder pre-trained on "
                                 "`datasets.pretrain`, zero-shot (and optionally fine-tuned) on the recipe's data")
