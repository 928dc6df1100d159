"""An LLM recommender over HTTP: OpenAI-compatible /v1/models, /v1/chat/completions, /v1/completions, and
/v1/recommend (history -> catalog items).

/v1/recommend decodes with beam search under a catalog trie (`recalign.llm.constrained`), so every answer is a
catalog title: the trie holds the request's allowed items ("+C": items of C only; "-C": no item of C; candidates:
only those), the beam width is k + the history items the trie still holds, and history items are dropped from
the beams afterwards. Requests arriving together share one batched `generate` per (trie, beam width) group on the
`MicroBatcher`'s model thread; a request's beam width depends only on the request, so answers do not depend on
which requests it was batched with.

Generation backends (`recalign.llm.backends`, `serve_llm(backend=...)`): transformers (default) runs everything
above in-process; with vllm (in-process, the stage's model merged once at start-up) or openai (another
OpenAI-compatible server, e.g. `vllm serve`) the completions go to that engine and /v1/recommend cannot walk the
trie: every request is answered with `decoding: grounded` (one greedy answer, then the nearest allowed titles).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import torch
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from recalign.errors import ConfigError, RecalignError, RequestError, shorten
from recalign.serve.app import (DEFAULT_MAX_WAIT_MS, TOKEN_ENV, MicroBatcher, bearer_auth, create_app, serve,
                                server_token)

DEFAULT_PORT = 8000
MAX_K = 50
MAX_HISTORY_ITEMS = 200
MAX_PROMPT_CHARS = 20000
MAX_TOKENS = 512
MAX_CACHED_TRIES = 64
MIN_TEMPERATURE = 1e-4  # below it sampling is greedy in the limit, and logits / T would overflow to inf
MASKED_SCORE = -1e4  # a beam below this mean log-prob went through masked tokens (fewer items than beams)


# ---- request bodies ----------------------------------------------------------------------------------------------
class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)]


class _Sampling(BaseModel):
    """The OpenAI fields honoured by both completion endpoints (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS, description="tokens generated at most")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy; > 0: sampling")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = Field(1, description="answers per prompt (only 1)")
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1, description="seed of the sampling draws")
    stream: Literal[False] = Field(False, description="streaming is not supported")


class ChatBody(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=64)]


PromptText = Annotated[StrictStr, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]  # an empty prompt has no token


class CompletionBody(_Sampling):
    """POST /v1/completions: one prompt or a list of prompts (one choice each)."""

    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=64)]


class RecommendBody(BaseModel):
    """POST /v1/recommend: a history (item ids or titles, oldest first) -> k catalog items."""

    model_config = ConfigDict(extra="forbid")
    history: Annotated[list[StrictInt | StrictStr], Field(max_length=MAX_HISTORY_ITEMS)] = Field(
        description="item ids (dense ints, or original id strings) or exact titles, oldest first")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="items returned at most")
    control: StrictStr | None = Field(None, description='"+C": only items of category C; "-C": no item of C')
    candidates: Annotated[list[StrictInt | StrictStr], Field(min_length=1, max_length=10000)] | None = Field(
        None, description="only these items (ids or titles)")
    decoding: Literal["constrained", "grounded"] = Field(
        "constrained", description="constrained: beam search under the catalog trie (score: mean token log-prob); "
                                   "grounded: one greedy answer, then the nearest titles (score: fuzzy similarity)")


class RecommendedItem(BaseModel):
    """One catalog item of a /v1/recommend answer."""

    id: int = Field(description="dense item id")
    original_id: str
    title: str
    score: float = Field(description="mean token log-prob (constrained) or title similarity 0..1 (grounded)")


class RecommendAnswer(BaseModel):
    """The /v1/recommend answer (documented in OpenAPI, not validated per request)."""

    model: str
    items: list[RecommendedItem] = Field(description="at most k items, best first")


# ---- jobs on the model thread ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextJob:
    """Prompts to complete with one set of decoding settings."""

    prompts: tuple[str, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int


@dataclass(frozen=True)
class RecommendJob:
    """One recommendation: its prompt, the allowed-items key, the history to drop and the beam width."""

    prompt: str
    allowed: tuple[int, ...]
    history: frozenset[int]
    k: int
    beams: int
    decoding: str = "constrained"


@dataclass
class ServedCatalog:
    """Titles, categories and the tokenised trie paths of every item (built once at start-up)."""

    titles: list[str]
    original_ids: list[str]
    category_items: dict[str, frozenset[int]]
    paths: list[tuple[int, ...]]  # prefix + title + suffix tokens, per item
    by_title: dict[str, int] = field(default_factory=dict)
    by_original: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for item in range(len(self.titles) - 1, -1, -1):  # the lowest id wins for a repeated title/id
            self.by_title[self.titles[item]] = item
            self.by_original[self.original_ids[item]] = item

    def resolve(self, value: int | str, what: str) -> int:
        """The dense id of an item given as an int id, an original id string or an exact title."""
        if isinstance(value, int):
            if 0 <= value < len(self.titles):
                return value
            raise RequestError(f"unknown {what} item id {value} (ids are 0..{len(self.titles) - 1})")
        if value in self.by_original:
            return self.by_original[value]
        if value in self.by_title:
            return self.by_title[value]
        raise RequestError(f"unknown {what} item {shorten(value)!r} (not an item id or a catalog title)")

    def allowed(self, control: str | None, candidates: Sequence[int] | None) -> tuple[int, ...]:
        """Sorted item ids a request may receive (before removing its history)."""
        items = set(range(len(self.titles))) if candidates is None else set(candidates)
        if control is not None:
            if len(control) < 2 or control[0] not in "+-":
                raise RequestError(f"control must look like '+Name' or '-Name', got {shorten(control)!r}")
            members = self.category_items.get(control[1:])
            if members is None:
                raise RequestError(f"unknown category {shorten(control[1:])!r}")
            items = items & members if control[0] == "+" else items - members
        return tuple(sorted(items))


class LLMRecommender:
    """A causal LM + tokenizer + catalog answering batches of text and recommendation jobs (one thread)."""

    def __init__(self, model, tokenizer, catalog: ServedCatalog, task, name: str, backend=None):
        from recalign.llm.backends import GenerationBackend, vllm_engine

        self.model, self.tokenizer, self.catalog, self.task, self.name = model, tokenizer, catalog, task, name
        self.backend = backend or GenerationBackend()
        self.engine = self.backend.resolved()  # transformers | vllm | openai
        self.runner = vllm_engine(self.backend, model, tokenizer) if self.engine == "vllm" else model
        self._tries: dict[tuple[int, ...], tuple[Any, dict[tuple[int, ...], int]]] = {}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # -- prompts
    def recommend_prompt(self, history: Sequence[int]) -> str:
        """The trained prompt (the task's template, the tokenizer's chat template) for a history."""
        from recalign.llm.prompts import render_prompt

        titles = [self.catalog.titles[i] for i in history]
        return render_prompt(self.tokenizer, self.task.messages(titles))

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """Chat messages rendered with the tokenizer's chat template, the assistant turn open."""
        from recalign.llm.prompts import render_prompt

        return render_prompt(self.tokenizer, [{"role": m.role, "content": m.content} for m in messages])

    @property
    def context(self) -> int | None:
        """The model's context length in tokens (None when its config does not say)."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def check_length(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        """Raise RequestError when a prompt plus its answer would not fit the model's context."""
        limit = self.context
        longest = max(self.count_tokens(prompts), default=0)
        if limit is not None and longest + max_new_tokens > limit:
            raise RequestError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                               f"context of {limit} tokens")

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text (no special tokens added)."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]] \
            if texts else []

    # -- the batched call
    def run(self, jobs: list[TextJob | RecommendJob]) -> list[Any]:
        """Answer a batch: one generate per group of compatible jobs; results keep the jobs' order."""
        results: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            key = ("text", job.max_tokens, job.temperature, job.top_p, job.seed) if isinstance(job, TextJob) \
                else (job.decoding, job.allowed, job.beams)
            groups.setdefault(key, []).append(index)
        for key, members in groups.items():
            group = [jobs[i] for i in members]
            answers = self._texts(group) if key[0] == "text" else \
                self._ground(group) if key[0] == "grounded" else self._recommend(group)
            for index, answer in zip(members, answers):
                results[index] = answer
        return results

    def _texts(self, jobs: list[TextJob]) -> list[list[str]]:
        from recalign.llm.backends import generate_answers
        from recalign.llm.generate import GenerationConfig

        first = jobs[0]
        settings = GenerationConfig(max_new_tokens=first.max_tokens, do_sample=first.temperature > 0,
                                      temperature=first.temperature if first.temperature > 0 else 1.0,
                                      top_p=first.top_p, seed=first.seed)
        prompts = [p for job in jobs for p in job.prompts]
        outputs = generate_answers(self.backend, self.runner, self.tokenizer, prompts, settings,
                                   batch_size=max(1, len(prompts)))
        answers, start = [], 0
        for job in jobs:
            answers.append([o[0] for o in outputs[start:start + len(job.prompts)]])
            start += len(job.prompts)
        return answers

    def trie(self, allowed: tuple[int, ...]) -> tuple[Any, dict[tuple[int, ...], int]]:
        """The trie over `allowed` items and its token path -> item map (cached)."""
        cached = self._tries.get(allowed)  # read once: the model thread and the event loop both call this
        if cached is None:
            from recalign.llm.constrained import CatalogTrie

            paths = [self.catalog.paths[i] for i in allowed]
            trie = CatalogTrie.from_sequences(paths, eos_token_id=self.tokenizer.eos_token_id, item_ids=allowed,
                                              vocab_size=len(self.tokenizer))
            lookup: dict[tuple[int, ...], int] = {}
            for item, path in zip(allowed, paths):
                lookup.setdefault(path, item)
            if len(self._tries) >= MAX_CACHED_TRIES:
                self._tries.pop(next(iter(self._tries)), None)
            cached = self._tries[allowed] = (trie, lookup)
        return cached

    def _recommend(self, jobs: list[RecommendJob]) -> list[list[dict]]:
        """Trie-constrained beam search for jobs sharing one allowed set and beam width."""
        from transformers import LogitsProcessorList

        from recalign.llm.constrained import TrieLogitsProcessor

        allowed, beams = jobs[0].allowed, jobs[0].beams
        if len(allowed) == 1:  # nothing to search: the only allowed item, unless it is history
            item = allowed[0]
            return [[] if item in job.history else [self._entry(item, 0.0)] for job in jobs]
        trie, lookup = self.trie(allowed)
        device = next(self.model.parameters()).device
        encoded = self.tokenizer([job.prompt for job in jobs], add_special_tokens=False)["input_ids"]
        old_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            batch = self.tokenizer.pad({"input_ids": encoded}, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = old_side
        width = batch["input_ids"].shape[1]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    logits_processor=LogitsProcessorList([TrieLogitsProcessor(trie, width)]),
                    max_new_tokens=trie.max_depth + 1, num_beams=beams, num_return_sequences=beams,
                    do_sample=False, temperature=None, top_p=None, top_k=None, early_stopping=False,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                    return_dict_in_generate=True, output_scores=True, use_cache=True)
        finally:
            self.model.train(was_training)
        tokens = out.sequences[:, width:].cpu().tolist()
        scores = out.sequences_scores.cpu().tolist()
        eos = self.tokenizer.eos_token_id
        answers = []
        for row, job in enumerate(jobs):
            chosen: list[dict] = []
            seen: set[int] = set()
            for beam in range(row * beams, (row + 1) * beams):
                path = tokens[beam]
                item = lookup.get(tuple(path[:path.index(eos)] if eos in path else path))
                if item is None or item in seen or item in job.history or scores[beam] < MASKED_SCORE:
                    continue
                seen.add(item)
                chosen.append(self._entry(item, scores[beam]))
                if len(chosen) == job.k:
                    break
            answers.append(chosen)
        return answers

    def _ground(self, jobs: list[RecommendJob]) -> list[list[dict]]:
        """One greedy answer per job, then the allowed titles nearest to its title (rapidfuzz ratio, 0..1)."""
        import numpy as np
        from rapidfuzz import fuzz, process

        from recalign.llm.backends import generate_answers
        from recalign.llm.generate import GenerationConfig
        from recalign.llm.grounding import normalise_title
        from recalign.llm.tasks import parse_title

        allowed = np.asarray(jobs[0].allowed, dtype=np.int64)
        settings = GenerationConfig(max_new_tokens=self.trie(jobs[0].allowed)[0].max_depth + 1)
        outputs = generate_answers(self.backend, self.runner, self.tokenizer, [job.prompt for job in jobs], settings,
                                   batch_size=len(jobs))
        queries = [normalise_title(parse_title(o[0])) for o in outputs]
        names = [normalise_title(self.catalog.titles[i]) for i in allowed]
        similarity = process.cdist(queries, names, scorer=fuzz.ratio, dtype=np.float64, workers=1) / 100.0
        answers = []
        for row, job in enumerate(jobs):
            order = np.lexsort((allowed, -similarity[row]))  # most similar first, ties -> lowest id
            keep = [i for i in order.tolist() if int(allowed[i]) not in job.history][:job.k]
            answers.append([self._entry(int(allowed[i]), float(similarity[row, i])) for i in keep])
        return answers

    def _entry(self, item: int, score: float) -> dict:
        return {"id": item, "original_id": self.catalog.original_ids[item], "title": self.catalog.titles[item],
                "score": round(float(score), 6)}

    # -- request -> job (checked before joining a batch)
    def recommend_job(self, body: RecommendBody) -> RecommendJob:
        """The job of a validated body; unknown items or categories raise RequestError."""
        history = [self.catalog.resolve(value, "history") for value in body.history]
        candidates = None if body.candidates is None else [self.catalog.resolve(v, "candidate")
                                                           for v in body.candidates]
        allowed = self.catalog.allowed(body.control, candidates)
        recent = history[-self.task.max_history:]
        excluded = frozenset(history)
        blocked = len(excluded.intersection(allowed))
        beams = min(len(allowed), max(2, body.k + blocked))
        prompt = self.recommend_prompt(recent)
        if allowed:
            self.check_length([prompt], self.trie(allowed)[0].max_depth + 1)
        if self.engine != "transformers":  # vllm/openai cannot walk the trie: grounded post-hoc instead
            body = body.model_copy(update={"decoding": "grounded"})
        return RecommendJob(prompt, allowed, excluded, body.k, beams if body.decoding == "constrained" else 0,
                            body.decoding)


def build_catalog(dataset, tokenizer, task) -> ServedCatalog:
    """The dataset's catalog with every title tokenised as the answer writes it (the template's quotes)."""
    prefix, suffix = task.template().title_affixes()
    titles = dataset.titles()
    encoded = tokenizer([f"{prefix}{t}{suffix}" for t in titles], add_special_tokens=False)["input_ids"]
    categories = {name: frozenset(int(i) for i in items) for name, items in dataset.category_index().items()}
    return ServedCatalog(titles, [str(x) for x in dataset.items["original_id"]], categories, [tuple(e) for e in encoded])


# ---- the app -----------------------------------------------------------------------------------------------------
def llm_app(model, tokenizer, dataset, task=None, *, name: str = "recalign-llm", token: str | None = None,
            max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_rows: int = 64, backend=None) -> FastAPI:
    """The LLM app over a loaded model, its tokenizer and the dataset's catalog; `token` guards every /v1 route."""
    from recalign.llm.tasks import SeqRecTask

    task = task or SeqRecTask()
    if getattr(task, "k", 1) != 1:
        raise ConfigError("serve llm: /v1/recommend needs a one-title task (task.k = 1)")
    engine = LLMRecommender(model, tokenizer, build_catalog(dataset, tokenizer, task), task, name, backend)
    app = create_app("recalign llm", f"{name}: OpenAI-compatible completions and /v1/recommend over "
                                     f"{len(engine.catalog.titles)} catalog items")
    batcher: MicroBatcher[TextJob | RecommendJob, Any] = MicroBatcher(
        engine.run, rows=lambda job: len(job.prompts) if isinstance(job, TextJob) else 1,
        max_wait_ms=max_wait_ms, max_rows=max_rows)
    app.state.batcher, app.state.engine = batcher, engine
    auth = [Depends(bearer_auth(token))]
    _add_completion_routes(app, engine, batcher, name, auth)
    _add_recommend_routes(app, engine, batcher, name, auth)
    return app


def _check_model(requested: str, name: str) -> None:
    """RequestError unless the request names the served model."""
    if requested != name:
        raise RequestError(f"unknown model {shorten(requested)!r}; this server serves {name!r}")


def _text_job(engine: LLMRecommender, name: str, body: _Sampling, prompts: list[str]) -> TextJob:
    """The job of a completion request (model and prompt length checked; tiny temperatures mean greedy)."""
    _check_model(body.model, name)
    engine.check_length(prompts, body.max_tokens or 32)
    temperature = float(body.temperature) if body.temperature >= MIN_TEMPERATURE else 0.0
    return TextJob(tuple(prompts), body.max_tokens or 32, temperature, float(body.top_p),
                   body.seed or 0)


def _usage(engine: LLMRecommender, prompts: list[str], answers: list[str]) -> dict:
    """The OpenAI `usage` object: prompt, completion and total token counts."""
    prompt_tokens, completion_tokens = sum(engine.count_tokens(prompts)), sum(engine.count_tokens(answers))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish(engine: LLMRecommender, answer: str, body: _Sampling) -> str:
    """The OpenAI finish_reason: "length" when the answer used all its tokens, else "stop"."""
    limit = body.max_tokens or 32
    return "length" if engine.count_tokens([answer])[0] >= limit else "stop"


def _add_completion_routes(app: FastAPI, engine: LLMRecommender, batcher: MicroBatcher, name: str,
                           auth: list) -> None:
    """The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""
    created = int(time.time())

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        """The served model."""
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "recalign"}]}

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat(body: ChatBody) -> JSONResponse:
        """OpenAI chat completion (the tokenizer's chat template)."""
        prompt = engine.chat_prompt(body.messages)
        answer = (await batcher.submit(_text_job(engine, name, body, [prompt])))[0]
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                        "finish_reason": _finish(engine, answer, body), "logprobs": None}],
            "usage": _usage(engine, [prompt], [answer])})

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(body: CompletionBody) -> JSONResponse:
        """OpenAI text completion of the prompt text as given (one choice per prompt)."""
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        answers = await batcher.submit(_text_job(engine, name, body, prompts))
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": name, "choices": [{"index": i, "text": a, "finish_reason": _finish(engine, a, body),
                                        "logprobs": None} for i, a in enumerate(answers)],
            "usage": _usage(engine, prompts, answers)})


def _add_recommend_routes(app: FastAPI, engine: LLMRecommender, batcher: MicroBatcher, name: str,
                          auth: list) -> None:
    """/v1/recommend (catalog items for a history) and /health (no auth)."""

    @app.post("/v1/recommend", dependencies=auth, response_model=None, responses={200: {"model": RecommendAnswer}})
    async def recommend(body: RecommendBody) -> JSONResponse:
        """Up to k catalog items for a history (never a history item; "-C": never an item of C)."""
        job = engine.recommend_job(body)
        if not set(job.allowed) - job.history:  # nothing left to recommend: no model call
            return JSONResponse({"model": name, "items": []})
        items = await batcher.submit(job)
        return JSONResponse({"model": name, "items": items})

    @app.get("/health")
    async def health() -> dict:
        """Liveness and what is served (no auth needed)."""
        return {"status": "ok", "model": name, "n_items": len(engine.catalog.titles),
                "categories": sorted(engine.catalog.category_items), "batches": batcher.batches,
                "batched_requests": batcher.jobs}


# ---- from a stage folder -----------------------------------------------------------------------------------------
def llm_app_from_stage(folder: str | os.PathLike, *, token: str | None = None,
                       max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_rows: int = 64,
                       progress: bool = False, backend=None) -> FastAPI:
    """The LLM app of a finished llm-sft stage RUN/stages/NAME: its base model + saved adapter, task and catalog."""
    from recalign.llm.models import load_model
    from recalign.stages import DONE, resolve_model_reference
    from recalign.runs import open_run
    from recalign.methods import get_stage

    stage_dir = Path(folder)
    run_dir = stage_dir.parent.parent
    if not (stage_dir / DONE).is_file() or stage_dir.parent.name != "stages":
        raise RecalignError(f"{shorten(str(stage_dir), 200)}: not a finished stage folder (RUN/stages/NAME)")
    recipe, dataset, _ = open_run(run_dir)
    spec = next((s for s in recipe.stages if s.name == stage_dir.name), None)
    if spec is None or spec.kind != "llm-sft":
        raise ConfigError(f"{stage_dir}: not an llm-sft stage of {run_dir} (kind {getattr(spec, 'kind', None)})")
    params = resolve_model_reference(get_stage(spec.kind).params.model_validate(spec.params), run_dir)
    if params.save == "none":
        raise ConfigError(f"{stage_dir}: the stage saved no model (save: none)")
    model_dir = stage_dir / "model"
    if backend is not None:
        backend.check(where="serve llm --backend")  # before loading anything
    # vllm/openai generate elsewhere: the local copy (prompts, lengths, vLLM's merge) stays on the CPU
    device = params.device if backend is None or backend.resolved() == "transformers" else "cpu"
    if params.save == "merged":
        model, tokenizer = load_model(str(model_dir), device=device, dtype=params.dtype, progress=progress)
    else:
        model, tokenizer = load_model(params.model, device=device, dtype=params.dtype, seed=recipe.seed,
                                      adapter=model_dir, progress=progress)
    return llm_app(model, tokenizer, dataset, params.task, name=f"{recipe.name}/{stage_dir.name}", token=token,
                   max_wait_ms=max_wait_ms, max_rows=max_rows, backend=backend)


def serve_llm(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
              max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_rows: int = 64, log_level: str = "warning",
              backend: str = "transformers", base_url: str | None = None, api_key_env: str | None = None,
              served_model: str | None = None) -> None:
    """Load the llm-sft stage `folder` and serve it until interrupted ($RECALIGN_TOKEN required off loopback).

    `backend`: transformers | vllm | openai | auto; openai forwards generation to `base_url` (key from the
    environment variable `api_key_env`, model `served_model`). See `recalign.llm.backends`.
    """
    from recalign.llm.backends import backend_from_options

    engine = backend_from_options(backend, base_url=base_url, api_key_env=api_key_env, model=served_model,
                                  where="serve llm")
    token = server_token(host, TOKEN_ENV)  # before loading anything: a refused bind costs nothing
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {port}")
    if max_wait_ms < 0:
        raise ConfigError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    if max_rows < 1:
        raise ConfigError(f"--max-rows must be >= 1, got {max_rows}")
    serve(llm_app_from_stage(folder, token=token, max_wait_ms=max_wait_ms, max_rows=max_rows, progress=True,
                             backend=engine),
          host, port, log_level)
