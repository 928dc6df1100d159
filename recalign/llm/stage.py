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
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError
from recalign.llm.backends import GenerationBackend
from recalign.llm.dpo import LoraSettings
from recalign.llm.generate import GenerationSettings
from recalign.llm.grounding import GroundingConfig
from recalign.llm.tasks import Rows, SeqRecTask
from recalign.llm.train import SFTSettings
from recalign.stages import Stage

if TYPE_CHECKING:
    from recalign.eval.lists import GeneratedLists
    from recalign.runs import RunContext

Decoding = Literal["greedy", "constrained"]


class LLMSFTParams(BaseModel):
    """Params of an "llm-sft" stage (defaults: a budget a 2-core CPU finishes; raise them on a GPU)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("smollm2", description="base model: HF id, local folder, .gguf file, 'smollm2' or 'tiny'")
    task: SeqRecTask = Field(default_factory=SeqRecTask, description="prompt task (history length, k titles)")
    train_rows: int | None = Field(512, ge=1, description="seeded subsample of SFT rows (null = all)")
    lora: LoraSettings | None = Field(default_factory=lambda: LoraSettings(r=8, alpha=16, dropout=0.05),
                                      description="LoRA adapter; null = full fine-tuning")
    sft: SFTSettings = Field(default_factory=SFTSettings, description="SFT hyper-parameters")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="decoding settings")
    backend: GenerationBackend = Field(default_factory=GenerationBackend,
                                       description="engine of the evaluation answers: transformers | vllm | openai "
                                                   "| auto (recalign.llm.backends); SFT always uses transformers")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    decodings: list[Decoding] = Field(default_factory=lambda: ["greedy"],
                                      description="decodings evaluated: greedy and/or constrained (catalog trie)")
    grounding: GroundingConfig = Field(default_factory=lambda: GroundingConfig(kind="embedding"),
                                       description="answer title -> K nearest catalog items (BIGRec/SPRec: "
                                                   "embedding L2)")
    eval_part: Literal["valid", "test"] = Field("test", description="split part evaluated (users: the recipe's "
                                                                     "eval.users, cut-offs: eval.ks)")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'")
    dtype: str = Field("auto", description="'auto' (fp32 on CPU, bf16 on GPU), 'float32' or 'bfloat16'")
    save: Literal["adapter", "merged", "none"] = Field("adapter", description="what is saved under <stage>/model")


# ---- evaluation of a trained model -----------------------------------------------------------------------------

def answer_lists(answers: Sequence[str], grounder, task: SeqRecTask, k: int) -> "torch.Tensor | GeneratedLists":
    """Each answer as a list: k = 1 task, the k catalog items nearest to its title (LongTensor [R, k]); a list
    task, its own titles grounded in order (`GeneratedLists`, scored with the §2.4 validity metrics)."""
    from recalign.llm.tasks import parse_title

    if task.k > 1:
        from recalign.llm.evaluate import ground_answers

        return ground_answers(answers, grounder, task.k)
    return grounder.topk([parse_title(a) for a in answers], k)


def evaluate_answers(answers: Sequence[str], rows: Rows, titles: Sequence[str], grounder, ks: Sequence[int],
                     task: SeqRecTask, popularity: torch.Tensor | None = None,
                     genre_table: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """Metrics of one answer per row (`recalign.eval.lists.score_lists`), and the top-K lists [R, max K].

    k = 1: the K catalog items nearest to the answer's title; valid_title_rate = share of answers whose title
    exactly names a catalog item. k > 1: the answer's titles, grounded in order (`recalign.llm.evaluate`), with
    the §2.4 validity metrics. An empty or unparsable answer is an empty list: a miss that counts.
    `popularity` (pop(i)) and `genre_table` (`eval.beyond.genre_weights`) switch on AvgPop and MGU/DGU.
    """
    from recalign.eval.lists import GeneratedLists, ListInputs, score_lists
    from recalign.llm.grounding import ExactGrounder
    from recalign.llm.tasks import parse_title

    targets = torch.as_tensor(rows.targets, dtype=torch.long)
    fields = dict(popularity=popularity, history=rows.histories, genre_table=genre_table)
    lists = answer_lists(answers, grounder, task, max(ks))
    if isinstance(lists, GeneratedLists):
        inputs = ListInputs.from_generated(lists, targets, len(titles), **fields)
        return score_lists(inputs, ks), inputs.lists
    metrics = score_lists(ListInputs(lists, targets, len(titles), **fields), ks)
    exact = ExactGrounder(titles).ground([parse_title(a) for a in answers])
    metrics["valid_title_rate"] = float((exact >= 0).float().mean()) if len(answers) else 0.0
    return metrics, lists


class AnswerLists:
    """A causal LM as a `recalign.eval.lists.ListRecommender`: last history titles -> generated answer -> list.

    For `recalign.eval.evaluate.evaluate(AnswerLists(...), dataset, split, ...)`: every method then is scored on
    the recipe's users and targets. `answers_` keeps the raw answers of the last call, in `users` order.
    """

    def __init__(self, model, tokenizer, task: SeqRecTask, titles: Sequence[str], grounder,
                 generation: GenerationSettings | None = None, batch_size: int = 8, decoding: Decoding = "greedy",
                 progress: bool = False, backend: GenerationBackend | None = None, scratch: Path | None = None):
        self.model, self.tokenizer, self.task, self.titles, self.grounder = model, tokenizer, task, titles, grounder
        self.generation, self.batch_size, self.progress = generation, batch_size, progress
        self.backend, self.scratch = backend or GenerationBackend(), scratch  # scratch: vllm's merged copy
        self.backend.check(constrained=decoding == "constrained")
        self.processor = catalog_constraint(titles, tokenizer, task) if decoding == "constrained" else None
        self.answers_: list[str] = []
        self.users_ = np.zeros(0, dtype=np.int64)
        self.lists_: torch.Tensor | None = None

    def answers(self, rows: Rows) -> list[str]:
        """One generated answer per row (its prompt from the row's history titles)."""
        from recalign.llm.backends import generate_answers
        from recalign.llm.tasks import prompts_for

        prompts = prompts_for(self.task, rows, self.titles, self.tokenizer)
        outputs = generate_answers(self.backend, self.model, self.tokenizer, prompts, self.generation,
                                   batch_size=self.batch_size, logits_processor=self.processor,
                                   progress=self.progress, scratch=self.scratch)
        return [o[0] for o in outputs]

    def recommend(self, users, histories, k: int):
        """Top-k lists of `users` given their `histories` (UserSequences), -1 padded; or `GeneratedLists`."""
        users = np.asarray(users, dtype=np.int64)
        recent = [histories[u][-self.task.max_history:].tolist() for u in users]  # one prompt per user
        rows = Rows(users, recent, np.full(len(users), -1, dtype=np.int64), next_items=[[] for _ in users])
        self.answers_ = self.answers(rows)
        self.users_ = users
        lists = answer_lists(self.answers_, self.grounder, self.task, k)
        self.lists_ = lists.lists() if hasattr(lists, "lists") else lists
        return lists

    def records(self, targets: "dict[int, int] | None" = None) -> list[dict]:
        """Per evaluated user of the last call: user, raw answer, top-K item ids (and target when given)."""
        lists = self.lists_.tolist() if self.lists_ is not None else [[] for _ in self.users_]
        return [{"user": int(u), **({"target": int(targets[int(u)])} if targets else {}), "answer": a, "top_k": row}
                for u, a, row in zip(self.users_.tolist(), self.answers_, lists)]


def catalog_constraint(titles: Sequence[str], tokenizer, task: SeqRecTask):
    """The trie of every catalog title wrapped in the answer's quotes, as a per-batch logits processor."""
    from recalign.llm.constrained import CatalogTrie
    from recalign.llm.generate import TrieConstraint

    if task.k != 1:
        raise ConfigError("constrained decoding needs a one-title task (task.k = 1)")
    prefix, suffix = task.template().title_affixes()
    return TrieConstraint(CatalogTrie.from_titles(list(titles), tokenizer, prefix=prefix, suffix=suffix))


def evaluate_llm(model, tokenizer, task: SeqRecTask, rows: Rows, titles: Sequence[str], grounder,
                 ks: Sequence[int], decodings: Sequence[str] = ("greedy",),
                 generation: GenerationSettings | None = None, batch_size: int = 8, progress: bool = False,
                 popularity: torch.Tensor | None = None, genre_table: torch.Tensor | None = None,
                 ) -> tuple[dict, dict[str, list[str]]]:
    """Generate for `rows` with every decoding and score the answers; returns (metrics, answers per decoding)."""
    metrics: dict = {}
    answers: dict[str, list[str]] = {}
    for position, decoding in enumerate(decodings):
        model_lists = AnswerLists(model, tokenizer, task, titles, grounder, generation, batch_size, decoding, progress)
        started = time.perf_counter()
        answers[decoding] = model_lists.answers(rows)
        seconds = time.perf_counter() - started
        scored, _ = evaluate_answers(answers[decoding], rows, titles, grounder, ks, task, popularity, genre_table)
        scored["generation_seconds"] = round(seconds, 3)
        prefix = "" if position == 0 else f"{decoding}."
        metrics.update({f"{prefix}{key}": value for key, value in scored.items()})
    return metrics, answers


# ---- the stage --------------------------------------------------------------------------------------------------

def run_llm_sft_stage(ctx: "RunContext", params: LLMSFTParams) -> dict:
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


def evaluate_decodings(ctx: "RunContext", model, tokenizer, params: LLMSFTParams, part: str = "test"
                       ) -> tuple[dict, list[dict]]:
    """Every decoding's answers on the recipe's users, scored by `ctx.evaluate` (the evaluator every stage uses).

    The first decoding's metrics are unprefixed, later ones carry "<decoding>." keys; per user one record with
    each decoding's raw answer and top-K items.
    """
    from recalign.llm.grounding import make_grounder

    titles = ctx.dataset.titles()
    grounder = make_grounder(params.grounding, titles)
    targets = _first_targets(ctx, part)
    pool = ray_answer_pool(ctx, model, tokenizer, params)  # None unless eval.backend is ray
    metrics: dict = {}
    records: list[dict] = []
    for position, decoding in enumerate(params.decodings):
        lists_model = AnswerLists(model, tokenizer, params.task, titles, grounder, params.generation,
                                  params.batch_size, decoding, ctx.progress, params.backend,
                                  ctx.stage_dir / "scratch")
        if pool is not None:  # the same lists, scored the same way; the answers come from the Ray workers
            lists_model = PooledAnswerLists(pool, tokenizer, params.task, titles, grounder, params.batch_size,
                                            decoding)
        started = time.perf_counter()
        scored = ctx.evaluate(lists_model, part=part)
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


def ray_answer_pool(ctx: "RunContext", model, tokenizer, params: LLMSFTParams):
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

        self.params, self.titles = LLMSFTParams(**params), titles
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
    `batch_size` prompts a batch; `recalign.llm.generate`), at batch boundaries: every prompt meets the same batch
    and padding as in-process, so the answers are identical, not merely equal up to float noise.
    """

    def __init__(self, pool, tokenizer, task: SeqRecTask, titles: Sequence[str], grounder, batch_size: int,
                 decoding: Decoding):
        super().__init__(None, tokenizer, task, titles, grounder, batch_size=batch_size)
        self.pool, self.decoding = pool, decoding

    def answers(self, rows: Rows) -> list[str]:
        """The workers' answers, one per row, in row order."""
        from recalign.eval.ray_backend import shard_bounds
        from recalign.llm.generate import batch_order
        from recalign.llm.tasks import prompts_for

        prompts = prompts_for(self.task, rows, self.titles, self.tokenizer)
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]] \
            if prompts else []
        order = batch_order(lengths)  # generate's own batches
        shards = [order[start:stop] for start, stop in shard_bounds(len(order), len(self.pool), self.batch_size)]
        answered = self.pool.map("answers", [(self.decoding, [int(rows.users[i]) for i in shard],
                                              [[int(item) for item in rows.histories[i]] for i in shard])
                                             for shard in shards])
        answers = [""] * len(prompts)
        for shard, texts in zip(shards, answered):
            for i, text in zip(shard, texts):
                answers[i] = text
        return answers


class RecipeAnswers:
    """An LLM loop's evaluator on the recipe's users: (model, tokenizer) -> `ctx.evaluate(AnswerLists(...))` metrics.

    Used by SPRec (and the next train -> generate -> score loops) under the default protocol: every checkpoint is
    scored on the same users, targets and metrics as the recipe's other stages. After a call `answers_` holds the
    per-user record (user, target, raw answer, top-K ids); `rows.users` are the users and `score(lists, index)`
    re-scores top-K lists on rows `index` (repeats allowed) for paired comparisons.
    """

    def __init__(self, ctx: "RunContext", task: SeqRecTask, grounder, generation: GenerationSettings | None = None,
                 batch_size: int = 8, part: str = "test", progress: bool = False,
                 backend: GenerationBackend | None = None):
        from recalign.eval.evaluate import relevant_items

        self.ctx, self.task, self.grounder, self.part = ctx, task, grounder, part
        self.generation, self.batch_size, self.progress = generation, batch_size, progress
        self.backend = backend or GenerationBackend()
        users = ctx.eval_users(part)
        targets = _first_targets(ctx, part)
        self.history = ctx.dataset.sequences(ctx.split.history(part))
        self.rows = Rows(users, [self.history[u][-task.max_history:].tolist() for u in users],
                         np.asarray([targets[int(u)] for u in users], dtype=np.int64))
        self.targets = targets
        eligible, relevant, counts = relevant_items(ctx.split.part(part), ctx.dataset.n_users)
        index = torch.from_numpy(np.searchsorted(eligible, users))
        self.relevant, self.counts = relevant[index], counts[index]
        from recalign.eval.beyond import catalog_genre_table, popularity

        self.popularity = popularity(ctx.split.history("valid")["item_id"].to_numpy(), ctx.dataset.n_items)
        self.genre_table = catalog_genre_table(ctx.dataset.item_categories())  # as `evaluate` builds them
        self.answers_: list[dict] = []

    def __call__(self, model, tokenizer) -> dict:
        """Generate for the recipe's users, ground, and score with the recipe's evaluator."""
        titles = self.ctx.dataset.titles()
        lists_model = AnswerLists(model, tokenizer, self.task, titles, self.grounder, self.generation,
                                  self.batch_size, progress=self.progress, backend=self.backend,
                                  scratch=self.ctx.stage_dir / "scratch")
        metrics = self.ctx.evaluate(lists_model, part=self.part, users=self.rows.users)
        metrics.update(title_validity(lists_model.answers_, titles, self.task))
        self.answers_ = lists_model.records(self.targets)
        return metrics

    def score(self, lists: torch.Tensor, index: np.ndarray | None = None) -> dict:
        """The list metrics of top-K lists [rows, K] on the evaluated users (or rows `index`, repeats allowed)."""
        from recalign.eval.lists import ListInputs, score_lists, users_sequences

        index = np.arange(len(self.rows)) if index is None else np.asarray(index, dtype=np.int64)
        chosen = torch.from_numpy(index)
        inputs = ListInputs(lists[chosen], self.relevant[chosen], self.ctx.dataset.n_items,
                            n_relevant=self.counts[chosen], popularity=self.popularity,
                            history=users_sequences(self.history, self.rows.users[index]), genre_table=self.genre_table)
        return score_lists(inputs, self.ctx.recipe.eval.ks)


def title_validity(answers: Sequence[str], titles: Sequence[str], task: SeqRecTask) -> dict:
    """valid_title_rate: the share of one-title answers that name a catalog title exactly ({} for list tasks)."""
    from recalign.llm.grounding import ExactGrounder
    from recalign.llm.tasks import parse_title

    if task.k > 1 or not len(answers):
        return {}
    exact = ExactGrounder(titles).ground([parse_title(a) for a in answers])
    return {"valid_title_rate": float((exact >= 0).float().mean())}


def _first_targets(ctx: "RunContext", part: str) -> dict[int, int]:
    """Each user's first item of `part` (the target of a leave-one-out split)."""
    frame = ctx.split.part(part).sort_values(["user_id", "timestamp"], kind="stable").drop_duplicates("user_id")
    return dict(zip(frame["user_id"].astype(int).tolist(), frame["item_id"].astype(int).tolist()))


def reevaluate_llm_stage(ctx: "RunContext", params: LLMSFTParams, part: str | None = None) -> dict:
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


LLM_SFT_STAGE = Stage(params=LLMSFTParams, run=run_llm_sft_stage,
                      description="BIGRec-style LLM recommender: SFT (LoRA) on history -> next title, generate, "
                                  "ground, evaluate HR/NDCG@K and the valid-title rate")

__all__ = ["LLMSFTParams", "LLM_SFT_STAGE", "AnswerLists", "RecipeAnswers", "evaluate_answers", "evaluate_llm", "evaluate_decodings",
           "catalog_constraint", "run_llm_sft_stage", "reevaluate_llm_stage", "title_validity"]
