"""RecGPT's recipe stage: catalogs of the pre-training and evaluation domains, pre-training, optional
fine-tuning, and zero-shot / fine-tuned evaluation through the list evaluator."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from recalign.checkpoints import IterationStore, stable_hash
from recalign.errors import ConfigError, DataError
from recalign.io import write_json
from recalign.methods.recgpt.algorithm import (
    CodeCatalog,
    RecGPTConfig,
    beam_recommender,
    build_catalogs,
    embed_items,
    finetune_decoder,
    pretrain_decoder,
    sample_sequences,
)
from recalign.methods.recgpt.codes import ItemCodes
from recalign.stages import Stage

# ---- the recipe stage ------------------------------------------------------------------------------------------

def _accuracy(metrics: dict) -> dict:
    """The accuracy keys of an evaluator result (hr/ndcg/recall/mrr/precision/map @K)."""
    return {k: v for k, v in metrics.items() if "@" in k and k.split("@")[0] in
            ("hr", "ndcg", "recall", "mrr", "precision", "map")}


def _evaluated(store: IterationStore, name: str, evaluate: Callable[[], dict]) -> dict:
    """An evaluation result, computed once and kept as a checkpoint."""
    folder = store.folder(name)
    if store.done(folder):
        return store.record(folder)
    result = {"loop": name, "iteration": 0, **evaluate()}
    store.commit(folder, result)
    return result


def run_stage(ctx, params: RecGPTConfig) -> dict:
    """Stage "recgpt": tokenise, pre-train on `datasets.pretrain`, zero-shot (+ fine-tuned) on the recipe's data."""
    if ctx.split is None:
        raise ConfigError("the recgpt stage needs a split")
    seed = int(params.seed if params.seed is not None else ctx.seed)
    pretrain = ctx.datasets("pretrain")
    target = ctx.dataset
    key = stable_hash({"params": params.model_dump(mode="json"), "pretrain": [d.fingerprint() for d in pretrain],
                       "data": target.fingerprint(), "split": ctx.recipe.split.model_dump(mode="json"),
                       "eval": ctx.recipe.eval.model_dump(mode="json", exclude={"table"}), "seed": seed})
    work = ctx.run_dir / "work" / f"{ctx.stage.name if ctx.stage else 'recgpt'}-{key}"
    store = IterationStore(work, key)
    started = time.perf_counter()

    # 1-2. sequences, item text embeddings, tokenizer and codes (pre-training catalogs keep their users' items)
    sequences, domains = [], {}
    for i, ds in enumerate(pretrain):
        seqs = sample_sequences(ds, users=params.pretrain.users, seed=seed + i)
        if not seqs:
            raise DataError(f"datasets.pretrain[{i}] ({ds.name}): no user has two or more interactions")
        used = np.unique(np.concatenate(seqs))
        remap = np.full(ds.n_items, -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        sequences.append([remap[s] for s in seqs])
        domains[f"pretrain-{i}"] = (ds, used)
    domains["target"] = (target, np.arange(target.n_items))
    tokenizer_dir = store.folder("tokenizer")
    if store.done(tokenizer_dir):
        catalogs = {name: CodeCatalog(name, embed_items(ds, items, params, ctx.progress),
                                  ItemCodes.load(tokenizer_dir / f"codes-{name}.safetensors"), items)
                    for name, (ds, items) in domains.items()}
        ctx.log("tokenizer: resumed")
    else:
        tokenizer, catalogs = build_catalogs(domains, [n for n in domains if n != "target"], params, seed,
                                             progress=ctx.progress)

        def write(tmp: Path) -> None:
            tokenizer.save(tmp / "tokenizer.safetensors")
            for name, catalog in catalogs.items():
                catalog.codes.save(tmp / f"codes-{name}.safetensors")

        store.commit(tokenizer_dir, {"loop": "tokenizer", "iteration": 0, "fsq_loss": tokenizer.history[-1],
                                     **{f"collision_rate_{n}": c.codes.collision_rate for n, c in catalogs.items()},
                                     "disambiguation_size": catalogs["target"].codes.sizes[-1]}, write)
    ctx.log(f"codes: target collision rate {catalogs['target'].codes.collision_rate:.4f}, "
            f"{sum(len(s) for s in sequences)} pre-training sequences")

    # 3. pre-training on every pretrain domain
    pre = [catalogs[f"pretrain-{i}"] for i in range(len(pretrain))]
    decoder = pretrain_decoder(pre, sequences, params, seed, store, progress=ctx.progress, log=ctx.log)

    # 4. zero-shot on the target, and 5. fine-tuned on its training part
    def score(model, variant: str) -> dict:
        out = {}
        for mode in params.history:
            excluded = mode == "excluded"
            name = f"eval-{variant}-history-{mode}"
            result = _evaluated(store, name, lambda: ctx.evaluate(
                beam_recommender(model, catalogs["target"], params.beam, excluded), exclude_history=excluded))
            out[mode] = {k: v for k, v in result.items() if k not in ("loop", "iteration")}
        return out

    zero = score(decoder, "zeroshot")
    tuned = None
    if params.finetune.epochs > 0:
        target_seqs = sample_sequences(target, ctx.split.train, params.finetune.users, seed)
        tuned = finetune_decoder(decoder, catalogs["target"], target_seqs, params, seed, store,
                                 progress=ctx.progress, log=ctx.log)
        tuned = score(tuned, "finetuned")

    headline = params.history[0]
    metrics = dict(zero[headline])
    metrics.update({"variant": "zero-shot", "history": headline,
                    "collision_rate": catalogs["target"].codes.collision_rate,
                    "pretrain_collision_rate": float(np.mean([c.codes.collision_rate for c in pre])),
                    "disambiguation_size": catalogs["target"].codes.sizes[-1],
                    "pretrain_sequences": sum(len(s) for s in sequences), "work_dir": str(work)})
    for mode in params.history[1:]:
        metrics.update({f"history_{mode}_{k}": v for k, v in _accuracy(zero[mode]).items()})
    if tuned is not None:
        for mode in params.history:
            prefix = "finetuned_" if mode == headline else f"finetuned_history_{mode}_"
            metrics.update({prefix + k: v for k, v in _accuracy(tuned[mode]).items()})
    write_json(ctx.stage_dir / "results.json", {"zero_shot": zero, "finetuned": tuned, "records": store.records})
    catalogs["target"].codes.save(ctx.stage_dir / "codes.safetensors")
    ctx.log(f"recgpt done in {time.perf_counter() - started:.0f}s")
    return metrics


RECGPT_STAGE = Stage(params=RecGPTConfig, run=run_stage,
                     reads=frozenset({"data", "split", "eval", "seed", "datasets"}),
                     description="RecGPT: FSQ item codes from text + a GPT decoder pre-trained on `datasets.pretrain`, "
                                 "zero-shot (and optionally fine-tuned) on the recipe's data")
