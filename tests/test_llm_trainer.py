"""Trainer plumbing (recalign.llm.trainer): CPU-safe arguments, one clean progress display, adapters, results."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from recalign.errors import ConfigError  # noqa: E402
from recalign.llm import trainer as plumbing  # noqa: E402
from recalign.llm.models import tiny_model  # noqa: E402
from recalign.llm.train import SFTConfig, sft_config, train_sft  # noqa: E402

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


EXAMPLES = [{"prompt": "<|im_start|>user\nnext?<|im_end|>\n<|im_start|>assistant\n", "completion": '"Dune"'}] * 4


def test_cpu_arguments_are_fp32_without_checkpointing(tmp_path):
    args = plumbing.trainer_args(output_dir=tmp_path, device="cpu", seed=3)
    assert args["use_cpu"] is True and args["bf16"] is False and args["fp16"] is False
    assert args["gradient_checkpointing"] is False and args["report_to"] == "none"
    assert args["seed"] == args["data_seed"] == 3 and args["disable_tqdm"] is True
    with pytest.raises(ConfigError, match="GPUs only"):
        plumbing.trainer_args(output_dir=tmp_path, device="cpu", bf16=True)
    with pytest.raises(ConfigError, match="device"):
        plumbing.trainer_args(output_dir=tmp_path, device="tpu")
    config = sft_config(SFTConfig(device="cpu"), tmp_path)
    assert config.use_cpu and not config.bf16 and not config.fp16 and not config.gradient_checkpointing


def test_report_to_is_checked():
    with pytest.raises(ConfigError, match="report_to"):
        plumbing.report_to_value("nowhere")
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        with pytest.raises(ConfigError, match="tensorboard"):
            plumbing.report_to_value("tensorboard")
    else:
        assert plumbing.report_to_value("tensorboard") == "tensorboard"


def test_sft_progress_shows_no_raw_log_dicts(tmp_path, capsys):
    """Issue 9 defect 9: one progress display with the loss, never `{'loss': ...}` lines from the printer."""
    settings = SFTConfig(max_steps=3, batch_size=2, learning_rate=1e-3)
    for progress in (True, False):
        model, tokenizer = tiny_model(seed=0)
        result = train_sft(model, tokenizer, EXAMPLES, settings, output_dir=tmp_path / str(progress),
                           lora=plumbing.LoraConfig(r=2, alpha=4, dropout=0.0), progress=progress)
        out = capsys.readouterr().out
        assert "{'loss'" not in out and "'train_runtime'" not in out
        if progress:
            assert "SFT" in out and f"loss {result.losses[-1]:.4f}" in out  # the bar shows the last logged loss
        else:
            assert out == ""
        assert len(result.losses) == 3 and result.seconds > 0 and result.output_dir == tmp_path / str(progress)
        summary = result.summary()
        assert summary["sft_steps"] == 3 and summary["sft_loss_last"] == result.losses[-1]


def test_train_result_summary_by_hand():
    log = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"train_loss": 1.75, "loss": 1.75, "train_runtime": 4.0}]
    result = plumbing.TrainResult(model=None, log_history=log, seconds=5.0, prefix="ppo")
    assert result.losses == [2.0, 1.5]
    assert result.summary() == {"ppo_steps": 2, "ppo_loss_first": 2.0, "ppo_loss_last": 1.5, "ppo_seconds": 4.0}


def test_adapter_helpers_attach_disable_merge_save_load(tmp_path):
    base, tokenizer = tiny_model(seed=1)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = base(ids).logits.clone()
    model = plumbing.attach_lora(base, plumbing.LoraConfig(r=2, alpha=4, dropout=0.0), seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.5)  # a non-zero adapter changes the outputs
        adapted = model(ids).logits.clone()
        with plumbing.reference_adapter_disabled(model) as reference:
            assert torch.allclose(reference(ids).logits, plain, atol=1e-6)  # π_ref = the base model
        assert not torch.allclose(adapted, plain, atol=1e-3)
        merged = plumbing.merged_copy(model)
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-4)
    folder = plumbing.save_adapter(model, tokenizer, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file() and not list(tmp_path.glob(".adapter.*"))
    fresh, _ = tiny_model(seed=1)
    loaded = plumbing.load_adapter(fresh, folder, trainable=False)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, adapted, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())
    plumbing.make_adapter_trainable(loaded)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    with pytest.raises(ConfigError, match="adapter_config"):
        plumbing.load_adapter(fresh, tmp_path)


def test_llm_modules_import_without_cycles():
    """`recalign.llm.trainer` imports nothing else of recalign.llm; models and dpo no longer import each other."""
    import ast
    from pathlib import Path

    import recalign.llm as package

    root = Path(package.__file__).parent

    def llm_imports(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recalign.llm")}

    assert llm_imports("trainer") == set()
    assert "recalign.llm.dpo" not in llm_imports("models")
    assert "recalign.llm.models" not in llm_imports("dpo")
