"""Batched text generation with one interface over three backends.

- ``"transformers"`` (default): `model.generate` on left-padded batches; prompts are sorted by token length so a
  batch wastes little padding, and answers come back in the input order. Greedy, sampling (seeded) and beam search;
  an optional logits processor (e.g. trie-constrained decoding, `TrieConstraint`).
- ``"openai"``: an OpenAI-compatible HTTP server (vLLM's `vllm serve`, `transformers serve`, ...) through its
  ``/v1/completions`` endpoint with the rendered prompt text; `model` is the served model name.
- ``"vllm"``: vLLM in-process (`vllm.LLM`); `model` is a model folder/id or an `LLM`. ``"auto"`` picks vLLM when
  it is importable and a GPU is present, else transformers.

Every backend returns ``list[list[str]]``: for each prompt, its `num_return_sequences` answers (special tokens
removed, the prompt not repeated). The transformers backend can also return `Generated` records
(`return_details=True`): the text, the generated token ids and each token's log-probability, as policy-gradient
methods (PPO, GRPO) need them. Stages take the backend from their recipe's `backend:` block
(`recalign.llm.backends`: `GenerationBackend`, `generate_answers`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from recalign.errors import ConfigError, RecalignError

BACKENDS = ("auto", "transformers", "openai", "vllm")


class GenerationConfig(BaseModel):
    """How answers are decoded (greedy by default)."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per answer at most")
    do_sample: bool = Field(False, description="sample (temperature/top_p) instead of greedy/beam search")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    num_beams: int = Field(1, ge=1, description="beam width (1 = greedy or sampling)")
    num_return_sequences: int = Field(1, ge=1, description="answers per prompt (<= num_beams for beam search)")
    seed: int = Field(0, description="seed of the sampling draws")
    fast: bool = Field(True, description="greedy one-answer decoding on the transformers backend (free or "
                                         "trie-constrained) runs `recalign.llm.fastgen`: the prompts' shared prefix "
                                         "prefilled once, finished rows dropped, same answers; false: model.generate")
    fast_batch_size: int | None = Field(64, ge=1, description="fast path: prompts per batch, length-sorted (at "
                                                               "least the caller's batch_size; null: exactly it). "
                                                               "Decoding 64 rows costs little more per step than 8")
    stop_after_titles: int | None = Field(None, ge=1, description="fast path: a row may stop once the first n "
                                                                  "titles of its answer are final (parse_titles of "
                                                                  "the answer then starts with the same n titles; "
                                                                  "the text after them is not generated)")

    @model_validator(mode="after")
    def _sequences_fit(self) -> "GenerationConfig":
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError("num_return_sequences must be <= num_beams without sampling "
                             "(greedy decoding has one answer per prompt)")
        return self


@dataclass
class Generated:
    """One generated answer with its tokens: ids [T] and log-probs [T] (EOS included when it was generated).

    `logprobs[t]` is log p(token_t | prompt, tokens_<t) under the model's own distribution at the sampling
    temperature (logits / temperature; temperature 1 for greedy decoding), before top-p and before any logits
    processor such as the trie constraint: the policy log-probability a teacher-forced forward pass over
    prompt + tokens gives. Padding after EOS is not included.
    """

    text: str
    token_ids: torch.Tensor
    logprobs: torch.Tensor

    @property
    def logprob(self) -> float:
        """The answer's total log-probability (sum over its tokens)."""
        return float(self.logprobs.sum())


class TrieConstraint:
    """Trie-constrained decoding as a per-batch logits processor: every answer walks a catalog title's tokens.

    The trie (`recalign.llm.constrained.CatalogTrie`) must be built with the prefix/suffix that surround the
    title in the answer (`PromptTemplate.title_affixes`).
    """

    def __init__(self, trie: Any):
        self.trie = trie

    def for_batch(self, prompt_length: int):
        """A fresh processor for one left-padded batch whose prompts are `prompt_length` tokens wide."""
        from recalign.llm.constrained import TrieLogitsProcessor

        return TrieLogitsProcessor(self.trie, prompt_length)


def generate(model, tokenizer, prompts: Sequence[str], settings: GenerationConfig | None = None,
             batch_size: int = 8, logits_processor: Any = None, backend: str = "transformers",
             progress: bool = False, return_details: bool = False,
             **backend_options: Any) -> list[list[str]] | list[list[Generated]]:
    """Answers for every prompt (rendered prompt strings): `num_return_sequences` strings each, in input order.

    `return_details=True` (transformers backend, greedy or sampling, not beam search) returns `Generated`
    records (text, token ids, per-token log-probs) instead of strings.

    `logits_processor`: None, a processor, a list of processors, or an object with `for_batch(prompt_length)`
    (e.g. `TrieConstraint`) that builds one per batch. `backend_options`: `base_url`, `api_key`, `timeout`
    (openai); `llm_options` (vllm).
    """
    settings = settings or GenerationConfig()
    if batch_size < 1:
        raise ConfigError("generation batch_size must be >= 1")
    if backend not in BACKENDS:
        raise ConfigError(f"generation backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        # vLLM loads its own copy of the weights: only worth it for a model given by name/folder.
        backend = "vllm" if vllm_usable() and logits_processor is None and isinstance(model, str) \
            else "transformers"
    prompts = list(prompts)
    if return_details and backend != "transformers":
        raise ConfigError("generation: token ids and log-probs (return_details) need the 'transformers' backend")
    if return_details and settings.num_beams > 1:
        raise ConfigError("generation: token log-probs (return_details) are for greedy or sampled decoding, "
                          "not beam search")
    if not prompts:
        return []
    if backend == "transformers":
        if isinstance(model, str) or tokenizer is None:
            raise ConfigError("generation backend 'transformers' needs a loaded model and its tokenizer "
                              "(recalign.llm.models.load_model)")
        return _generate_transformers(model, tokenizer, prompts, settings, batch_size, logits_processor, progress,
                                      return_details)
    if logits_processor is not None:
        raise ConfigError(f"generation backend {backend!r} takes no logits processor; use 'transformers'")
    if backend == "openai":
        return _generate_openai(model, prompts, settings, batch_size, progress, **backend_options)
    return _generate_vllm(model, prompts, settings, **backend_options)


def vllm_installed() -> bool:
    """Whether `import vllm` can work here."""
    return importlib.util.find_spec("vllm") is not None


def vllm_usable() -> bool:
    """vLLM installed and a GPU present: what backend 'auto' picks vLLM for."""
    return vllm_installed() and torch.cuda.is_available()


def batch_order(lengths: Sequence[int]) -> list[int]:
    """The order in which the transformers backend batches prompts of these token lengths: longest first, ties in
    input order (similar lengths share a batch, and a too-long batch fails at once)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _batches(count: int, batch_size: int, progress: bool, description: str):
    starts = range(0, count, batch_size)
    if not progress:
        return starts
    from rich.progress import track

    return track(starts, description=description, total=len(starts))


# ---- transformers ---------------------------------------------------------------------------------------------

def _processors(logits_processor: Any, prompt_length: int):
    from transformers import LogitsProcessorList

    if logits_processor is None:
        return None
    if hasattr(logits_processor, "for_batch"):
        return LogitsProcessorList([logits_processor.for_batch(prompt_length)])
    if isinstance(logits_processor, (list, tuple)):
        return LogitsProcessorList(list(logits_processor))
    return LogitsProcessorList([logits_processor])


def _eos_ids(model, tokenizer) -> torch.Tensor:
    """Every token id that ends an answer (the generation config's EOS ids and the tokenizer's)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def _details(sequences: torch.Tensor, logits: Sequence[torch.Tensor], texts: list[str], temperature: float,
             eos: torch.Tensor) -> list[Generated]:
    """`Generated` records of one batch: chosen tokens, their log-probs, cut after the first EOS."""
    # One [N, V] step at a time: a [N, T, V] stack of a 49k-token vocabulary would be large.
    logprobs = torch.stack([torch.log_softmax(step.float() / temperature, dim=-1).gather(
        1, sequences[:, t:t + 1].to(step.device)).squeeze(1) for t, step in enumerate(logits)], dim=1).cpu()
    tokens = sequences.cpu()                                                    # [N, T] generated part only
    is_eos = torch.isin(tokens, eos)
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full((len(tokens),), tokens.shape[1]))
    return [Generated(text, tokens[i, :n].clone(), logprobs[i, :n].clone())
            for i, (text, n) in enumerate(zip(texts, first.tolist()))]


# Generation-config fields that add logits processors to `model.generate`: the fast path applies none of them.
_PROCESSOR_FIELDS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                     "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                     "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
                     "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0), "renormalize_logits": (None, False)}


def fast_path_applies(model, settings: GenerationConfig, logits_processor: Any = None,
                      return_details: bool = False) -> bool:
    """Whether `recalign.llm.fastgen.decode_greedy` gives these answers: greedy, one answer per prompt, no
    token details, no processor but a trie constraint, and no processor-adding field in the model's config."""
    if not settings.fast or settings.do_sample or settings.num_beams > 1 or settings.num_return_sequences > 1:
        return False
    if return_details or (logits_processor is not None and not hasattr(logits_processor, "trie")):
        return False
    config = getattr(model, "generation_config", None)
    return all(getattr(config, name, None) in allowed for name, allowed in _PROCESSOR_FIELDS.items())


def generation_batch_size(settings: GenerationConfig, batch_size: int, model=None, logits_processor: Any = None
                          ) -> int:
    """Prompts per batch the transformers backend uses: `batch_size`, raised to `fast_batch_size` on the fast path."""
    if fast_path_applies(model, settings, logits_processor):
        return max(batch_size, settings.fast_batch_size or batch_size)
    return batch_size


def _generate_fast(model, tokenizer, encoded: list[list[int]], settings: GenerationConfig, batch_size: int,
                   logits_processor: Any, progress: bool) -> list[list[str]]:
    from recalign.llm.fastgen import DecodeConfig, decode_greedy

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # what model.generate stops at
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    config = DecodeConfig(settings.max_new_tokens, eos, tokenizer.pad_token_id, settings.stop_after_titles,
                          logits_processor)
    order = batch_order([len(ids) for ids in encoded])
    batch_size = generation_batch_size(settings, batch_size, model, logits_processor)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return decode_greedy(model, tokenizer, encoded, order, batch_size, config,
                                 lambda n: _batches(n, batch_size, progress, "generating"))
    finally:
        model.train(was_training)


def _generate_transformers(model, tokenizer, prompts: list[str], settings: GenerationConfig, batch_size: int,
                           logits_processor: Any, progress: bool, return_details: bool = False) -> list[list[Any]]:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if fast_path_applies(model, settings, logits_processor, return_details):
        return _generate_fast(model, tokenizer, encoded, settings, batch_size, logits_processor, progress)
    order = batch_order([len(ids) for ids in encoded])
    answers: list[list[Any]] = [[] for _ in prompts]
    n_return = settings.num_return_sequences
    options = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                   num_beams=settings.num_beams, num_return_sequences=n_return,
                   pad_token_id=tokenizer.pad_token_id,
                   use_cache=True)  # transformers' Trainer leaves config.use_cache=False after training
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p)
    else:  # greedy/beam: neutral sampling fields, so a model's generation_config defaults do not warn or apply
        options.update(temperature=None, top_p=None, top_k=None)
    if return_details:  # raw logits of every step, before temperature, top-p and the logits processors
        options.update(output_logits=True, return_dict_in_generate=True)
    temperature = settings.temperature if settings.do_sample else 1.0
    eos = _eos_ids(model, tokenizer)
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # every row's answer starts at the same column
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(settings.seed)  # sampling draws; the caller's generator is left as it was
            for start in _batches(len(order), batch_size, progress, "generating"):
                index = order[start:start + batch_size]
                batch = tokenizer.pad({"input_ids": [encoded[i] for i in index]}, return_tensors="pt",
                                      padding=True)
                width = batch["input_ids"].shape[1]
                out = model.generate(input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device),
                                     logits_processor=_processors(logits_processor, width), **options)
                sequences = out.sequences if return_details else out
                texts = tokenizer.batch_decode(sequences[:, width:], skip_special_tokens=True)
                if return_details:
                    texts = _details(sequences[:, width:], out.logits, texts, temperature, eos)
                for row, i in enumerate(index):
                    answers[i] = texts[row * n_return:(row + 1) * n_return]
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers


# ---- OpenAI-compatible HTTP server ------------------------------------------------------------------------------

def v1_url(base_url: str, endpoint: str) -> str:
    """The /v1/<endpoint> URL of a server given as 'http://host:port' or 'http://host:port/v1'."""
    base = base_url.rstrip("/")
    return f"{base}/{endpoint}" if base.endswith("/v1") else f"{base}/v1/{endpoint}"


def completions_url(base_url: str) -> str:
    """The /v1/completions URL of a server given as 'http://host:port' or 'http://host:port/v1'."""
    return v1_url(base_url, "completions")


def _generate_openai(model, prompts: list[str], settings: GenerationConfig, batch_size: int, progress: bool,
                     base_url: str | None = None, api_key: str | None = None, timeout: float = 120.0
                     ) -> list[list[str]]:
    import httpx

    if base_url is None:
        raise ConfigError("generation backend 'openai' needs base_url (e.g. http://127.0.0.1:8000)")
    if settings.num_beams > 1:
        raise ConfigError("generation backend 'openai' does not do beam search; use 'transformers' or sampling")
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise ConfigError("generation backend 'openai': pass the served model name as `model`")
    url = completions_url(base_url)
    n = settings.num_return_sequences
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answers: list[list[str]] = []
    with httpx.Client(timeout=timeout, headers=headers) as client:
        for start in _batches(len(prompts), batch_size, progress, "generating (server)"):
            batch = prompts[start:start + batch_size]
            body = {"model": name, "prompt": batch, "max_tokens": settings.max_new_tokens, "n": n,
                    "temperature": settings.temperature if settings.do_sample else 0.0,
                    "top_p": settings.top_p if settings.do_sample else 1.0, "seed": settings.seed + start}
            try:
                response = client.post(url, json=body)
            except httpx.HTTPError as exc:
                raise RecalignError(f"generation server {url}: {type(exc).__name__}: {exc}") from None
            if response.status_code != 200:
                detail = response.text.strip().splitlines()[:1] or [""]
                raise RecalignError(f"generation server {url}: HTTP {response.status_code} {detail[0][:200]}")
            answers.extend(_choices(response.json(), len(batch), n, url))
    return answers


def _choices(payload: Any, n_prompts: int, n: int, url: str) -> list[list[str]]:
    """Group a completions response's choices by prompt (choice index = prompt * n + j)."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or len(choices) != n_prompts * n:
        got = len(choices) if isinstance(choices, list) else "no"
        raise RecalignError(f"generation server {url}: expected {n_prompts * n} choices, got {got}")
    grouped: list[list[str]] = [[""] * n for _ in range(n_prompts)]
    for position, choice in enumerate(choices):
        index = choice.get("index", position) if isinstance(choice, dict) else position
        if not isinstance(index, int) or not 0 <= index < n_prompts * n:
            raise RecalignError(f"generation server {url}: choice index {index!r} out of range")
        grouped[index // n][index % n] = str(choice.get("text") or "")
    return grouped


# ---- vLLM in-process ------------------------------------------------------------------------------------------------

def _generate_vllm(model, prompts: list[str], settings: GenerationConfig, llm_options: dict | None = None
                   ) -> list[list[str]]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ConfigError("generation backend 'vllm': vllm is not installed (pip install vllm, on a GPU machine)") \
            from None
    if settings.num_beams > 1:
        raise ConfigError("generation backend 'vllm': beam search is not wired here; use 'transformers'")
    if isinstance(model, LLM):
        llm = model
    elif isinstance(model, str):
        llm = LLM(model=model, seed=settings.seed, **(llm_options or {}))
    else:
        raise ConfigError("generation backend 'vllm': pass a model folder/id (a merged model) or a vllm.LLM")
    params = SamplingParams(n=settings.num_return_sequences, max_tokens=settings.max_new_tokens,
                            temperature=settings.temperature if settings.do_sample else 0.0,
                            top_p=settings.top_p if settings.do_sample else 1.0, seed=settings.seed)
    outputs = llm.generate(prompts, params)
    return [[o.text for o in out.outputs] for out in outputs]
