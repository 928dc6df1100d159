"""A plain LLM sequential recommender (BIGRec-style) and its recipe stage, kind "llm-sft".

    rows   <- SeqRec rows of the split: history titles -> the next item's title     (recalign.llm.tasks)
    θ      <- SFT(base model + LoRA, train rows), loss on the answer only            (recalign.llm.train)
    answer <- generate(θ, test prompts), greedy; optionally trie-constrained        (recalign.llm.generate)
    top-K  <- the K catalog items nearest to the answer's title                     (recalign.llm.grounding)
    metrics: the list evaluator (recalign.eval.lists) + valid_title_rate (the answer names a catalog title exactly)

Decodings: "greedy" (free text), "constrained" (greedy under a catalog trie: the answer is always a title;
`recalign.llm.constrained`). With a list task (k > 1) the answer's own titles, grounded, are the list
(`recalign.llm.evaluate`). The first decoding's metrics are unprefixed; later ones carry "<decoding>." keys.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from recalign.errors import ConfigError
from recalign.llm.answers import (
    AnswerLists,
    Decoding,
    first_targets,
    title_validity,
)
from recalign.llm.generate import GenerationConfig
from recalign.llm.tasks import Rows, SeqRecTask
from recalign.methods.llm_sft.config import LLMSFTConfig
from recalign.stages import Stage

if TYPE_CHECKING:
    from recalign.stages import RunContext



# ---- evaluation of a trained model -----------------------------------------------------------------------------


# ---- the stage --------------------------------------------------------------------------------------------------

def run_llm_sft_stage(ctx: "RunContext", params: LLMSFTConfig) -> dict:
    """SFT a causal LM on the split's train rows, then score its answers on the recipe's users (`ctx.evaluate`)."""
    from recalign.llm.models import load_model, save_model
    from recalign.llm.tasks import sample_rows, sft_examples
    from recalign.llm.train import train_sft

    if ctx.split is None:
        raise ConfigError("an llm-sft stage needs a split (add `split:` to the recipe)")
    if not params.decodings:
        raise ConfigError("llm-sft: decodings must name at least one of greedy, constrained")
    _check_eval_backend(ctx)  # eval.backend ray without ray: fail before training
    params.backend.check(constrained="constrained" in params.decodings, where="llm-sft backend")  # before training
    titles = ctx.dataset.titles()
    task = params.task
    train = sample_rows(task.train_rows(ctx.dataset, ctx.split), params.train_rows, ctx.seed)
    users = ctx.eval_users(params.eval_part)
    if len(train) == 0:
        raise ConfigError("llm-sft: no train rows; every user needs >= 2 train interactions")
    ctx.log(f"load {params.model}; SFT on {len(train)} rows, evaluate {len(users)} {params.eval_part} users")
    model, tokenizer = load_model(params.model, device=params.device, dtype=params.dtype, seed=ctx.seed,
                                  lora=params.lora, progress=ctx.progress)  # the LoRA init is seeded too
    sft = params.sft.model_copy(update={"device": params.device})  # sft.seed: the recipe seed unless set
    result = train_sft(model, tokenizer, sft_examples(task, train, titles, tokenizer), sft,
                       output_dir=ctx.stage_dir / "scratch", progress=ctx.progress)
    ctx.log(f"SFT: {result.summary()}")
    if params.save != "none":  # before evaluating: Ray workers (eval.backend ray) load the model from here
        save_model(result.model, tokenizer, ctx.stage_dir / "model", merge=params.save == "merged")
    metrics, records = evaluate_decodings(ctx, result.model, tokenizer, params, params.eval_part)
    _write_records(ctx.stage_dir / "answers.jsonl", records, titles)
    _remove(ctx.stage_dir / "scratch")
    return {"model": params.model, "train_rows": len(train), **result.summary(), **metrics}


def evaluate_decodings(ctx: "RunContext", model, tokenizer, params: LLMSFTConfig, part: str = "test"
                       ) -> tuple[dict, list[dict]]:
    """Every decoding's answers on the recipe's users, scored by `ctx.evaluate` (the evaluator every stage uses).

    The first decoding's metrics are unprefixed, later ones carry "<decoding>." keys; per user one record with
    each decoding's raw answer and top-K items.
    """
    from recalign.llm.grounding import make_grounder

    titles = ctx.dataset.titles()
    grounder = make_grounder(params.grounding, titles)
    targets = first_targets(ctx, part)
    pool = ray_answer_pool(ctx, model, tokenizer, params)  # None unless eval.backend is ray
    metrics: dict = {}
    records: list[dict] = []
    for position, decoding in enumerate(params.decodings):
        lists_model = AnswerLists(model, tokenizer, params.task, titles, grounder, params.generation,
                                  params.batch_size, decoding, ctx.progress, params.backend,
                                  ctx.stage_dir / "scratch")
        if pool is not None:  # the same lists, scored the same way; the answers come from the Ray workers
            lists_model = PooledAnswerLists(pool, tokenizer, params.task, titles, grounder, params.batch_size,
                                            decoding, params.generation)
        started = time.perf_counter()
        scored = ctx.evaluate(lists_model, part=part, label=None if position == 0 else f"{part}-{decoding}")
        scored["generation_seconds"] = round(time.perf_counter() - started, 3)
        scored.update(title_validity(lists_model.answers_, titles, params.task))
        prefix = "" if position == 0 else f"{decoding}."
        metrics.update({f"{prefix}{key}": value for key, value in scored.items()})
        for i, record in enumerate(lists_model.records(targets)):
            if position == 0:
                records.append({"user": record["user"], "target": record["target"]})
            records[i].update({f"answer_{decoding}": record["answer"], f"top_k_{decoding}": record["top_k"]})
    if pool is not None:
        pool.close()
    return metrics, records


# ---- eval.backend ray: the test users' answers from Ray workers, each with its own engine ------------------------

def _check_eval_backend(ctx: "RunContext") -> None:
    """With `eval.backend: ray`, a one-line ConfigError now when ray is not installed."""
    if ctx.recipe.eval.backend == "ray":
        from recalign.eval.ray_backend import import_ray

        import_ray()


def ray_answer_pool(ctx: "RunContext", model, tokenizer, params: LLMSFTConfig):
    """`eval.workers` Ray workers each loading the stage's saved model (<stage>/model, or a scratch copy) from
    disk: a `recalign.eval.ray_backend.WorkerPool` of `AnswerEngine`s; None when `eval.backend` is local."""
    spec = ctx.recipe.eval
    if spec.backend != "ray":
        return None
    from recalign.eval.ray_backend import WorkerPool
    from recalign.llm.models import resolve_device, save_model

    folder = ctx.stage_dir / "model"
    if params.save == "none" or not folder.is_dir():
        folder = save_model(model, tokenizer, ctx.stage_dir / "scratch" / "ray-model")
    folder = folder.resolve()  # workers (on other machines too) may start in another directory
    gpus = 1.0 if resolve_device(params.device).type == "cuda" else 0.0
    ctx.log(f"eval.backend ray: {spec.workers} workers load {folder}")
    return WorkerPool(AnswerEngine, (str(folder), params.model_dump(mode="json"), list(ctx.dataset.titles()),
                                     ctx.seed), workers=spec.workers, num_gpus=gpus)


class AnswerEngine:
    """One Ray worker's generation engine: the stage's model loaded from a saved folder, answering rows."""

    def __init__(self, folder: str, params: dict, titles: list[str], seed: int):
        from recalign.llm.models import load_model

        self.params, self.titles = LLMSFTConfig(**params), titles
        p = self.params
        if (Path(folder) / "adapter_config.json").is_file():  # base model + saved LoRA adapter
            self.model, self.tokenizer = load_model(p.model, device=p.device, dtype=p.dtype, seed=seed,
                                                    adapter=folder, progress=False)
        else:  # merged or fully fine-tuned weights
            self.model, self.tokenizer = load_model(folder, device=p.device, dtype=p.dtype, progress=False)

    def answers(self, decoding: str, users: list[int], histories: list[list[int]]) -> list[str]:
        """One answer per (user, history) row, exactly as `AnswerLists.answers` gives it in-process."""
        p = self.params
        rows = Rows(np.asarray(users, dtype=np.int64), histories, np.full(len(users), -1, dtype=np.int64))
        lists = AnswerLists(self.model, self.tokenizer, p.task, self.titles, None, p.generation, p.batch_size,
                            decoding, False, p.backend)
        return lists.answers(rows)


class PooledAnswerLists(AnswerLists):
    """`AnswerLists` whose answers come from a pool of `AnswerEngine` Ray workers, gathered in row order.

    The rows are cut into contiguous shards of the order in which generation batches them (longest prompt first,
    `generation_batch_size` prompts a batch; `recalign.llm.generate`), at batch boundaries: every prompt meets the
    same batch and padding as in-process. On the fast path a shard's shared prompt prefix may be longer than the
    whole set's (more of it prefilled once): equal answers up to float rounding.
    """

    def __init__(self, pool, tokenizer, task: SeqRecTask, titles: Sequence[str], grounder, batch_size: int,
                 decoding: Decoding, generation: GenerationConfig | None = None):
        super().__init__(None, tokenizer, task, titles, grounder, generation, batch_size=batch_size)
        self.pool, self.decoding = pool, decoding

    def answers(self, rows: Rows) -> list[str]:
        """The workers' answers, one per row, in row order."""
        from recalign.eval.ray_backend import shard_bounds
        from recalign.llm.generate import batch_order, generation_batch_size
        from recalign.llm.tasks import prompts_for

        prompts = prompts_for(self.task, rows, self.titles, self.tokenizer)
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]] \
            if prompts else []
        order = batch_order(lengths)  # generate's own batches
        size = generation_batch_size(self.settings(), self.batch_size)  # the workers' batches (trie or not)
        shards = [order[start:stop] for start, stop in shard_bounds(len(order), len(self.pool), size)]
        answered = self.pool.map("answers", [(self.decoding, [int(rows.users[i]) for i in shard],
                                              [[int(item) for item in rows.histories[i]] for i in shard])
                                             for shard in shards])
        answers = [""] * len(prompts)
        for shard, texts in zip(shards, answered):
            for i, text in zip(shard, texts):
                answers[i] = text
        return answers


def reevaluate_llm_stage(ctx: "RunContext", params: LLMSFTConfig, part: str | None = None) -> dict:
    """Evaluate the model a finished llm-sft stage saved under <stage>/model again (for `recalign eval`)."""
    from recalign.llm.models import load_model

    if ctx.split is None:
        raise ConfigError("llm-sft evaluation needs the run's split")
    if params.save == "none":
        raise ConfigError(f"{ctx.stage_dir}: the stage saved no model (save: none); re-run it with save: adapter")
    folder = ctx.stage_dir / "model"
    if params.save == "merged":
        model, tokenizer = load_model(str(folder), device=params.device, dtype=params.dtype, progress=ctx.progress)
    else:
        model, tokenizer = load_model(params.model, device=params.device, dtype=params.dtype, seed=ctx.seed,
                                      adapter=folder, progress=ctx.progress)
    part = part or params.eval_part
    params.backend.check(constrained="constrained" in params.decodings, where="llm-sft backend")
    metrics, _ = evaluate_decodings(ctx, model, tokenizer, params, part)
    return {"model": params.model, "part": part, **metrics}


def _write_records(path: Path, records: list[dict], titles: Sequence[str]) -> None:
    """One JSON line per evaluated user: user, target (and its title), each decoding's raw answer and top-K."""
    from recalign.io import write_atomic

    lines = [json.dumps({**r, "target_title": titles[r["target"]]} if r.get("target") is not None else r,
                        ensure_ascii=False) for r in records]
    write_atomic(path, "\n".join(lines) + "\n")


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


LLM_SFT_STAGE = Stage(multi_process=True, params=LLMSFTConfig, run=run_llm_sft_stage,
                      description="BIGRec-style LLM recommender: SFT (LoRA) on history -> next title, generate, "
                                  "ground, evaluate HR/NDCG@K and the valid-title rate")

__all__ = ["LLM_SFT_STAGE", "evaluate_decodings", "run_llm_sft_stage", "reevaluate_llm_stage"]
