"""DPO wrapper (recalign.llm.dpo): loss starts at ln 2 with policy == reference, falls on a toy preference set,
and the frozen reference never changes (explicit ref model, disabled adapter, and TRL's copied "ref" adapter)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from transformers import TrainerCallback  # noqa: E402

from recalign.errors import ConfigError  # noqa: E402
from recalign.llm.dpo import DPOConfig, train_dpo
from recalign.llm.trainer import LoraConfig  # noqa: E402

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


def tiny_model_and_tokenizer(seed: int = 0):
    """A 2-layer random Llama with a small byte-level BPE tokenizer and a ChatML template (built in memory)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(['history: "Book", "Alpha", "Omega" user assistant'] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<pad>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config), tokenizer


def _pairs(tokenizer, n: int = 8) -> list[dict]:
    """A toy preference set: for every prompt the same title is chosen over another one."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"history {i}: \"Book {i}\""}],
                                             tokenize=False, add_generation_prompt=True) for i in range(n)]
    return [{"prompt": p, "chosen": "\"Alpha\"\n", "rejected": "\"Omega\"\n"} for p in prompts]


FAST = DPOConfig(learning_rate=5e-3, max_steps=6, batch_size=4, grad_accum=1, seed=0)


def test_loss_starts_at_ln2_and_falls(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    result = train_dpo(model, tokenizer, _pairs(tokenizer), FAST, output_dir=tmp_path,
                       lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    losses = result.losses
    assert len(losses) == FAST.max_steps
    # policy == reference at step 0 (fresh LoRA B = 0), so every margin is 0 and the loss is -log σ(0) = ln 2
    assert losses[0] == pytest.approx(math.log(2.0), abs=1e-3)
    assert losses[-1] < losses[0] - 0.01
    assert result.summary()["dpo_loss_first"] == pytest.approx(math.log(2.0), abs=1e-3)


def test_explicit_reference_model_is_frozen(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer(seed=1)
    reference, _ = tiny_model_and_tokenizer(seed=1)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_dpo(model, tokenizer, _pairs(tokenizer), FAST, output_dir=tmp_path, ref_model=reference)
    assert result.losses[0] == pytest.approx(math.log(2.0), abs=1e-3)  # identical weights at step 0
    after = reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trained = result.model.state_dict()
    assert any(not torch.equal(policy_before[k], trained[k]) for k in policy_before)


def test_base_weights_unchanged_under_fresh_adapter(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer(seed=2)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_dpo(model, tokenizer, _pairs(tokenizer), FAST, output_dir=tmp_path,
                       lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    base_after = result.model.get_base_model().state_dict()
    # with adapters disabled the policy is π_ref: the base weights must be bit-identical
    for name, value in base_before.items():
        key = name if name in base_after else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(value, base_after[key]), name


class _SnapshotRefAdapter(TrainerCallback):
    """Copies TRL's frozen "ref" adapter at the start and the end of training."""

    def __init__(self):
        self.begin: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    @staticmethod
    def _ref(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.begin = self._ref(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end = self._ref(model)


def test_existing_adapter_reference_is_a_frozen_copy(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_model_and_tokenizer(seed=3)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter stands in for the SFT adapter
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    snapshot = _SnapshotRefAdapter()
    result = train_dpo(model, tokenizer, _pairs(tokenizer), FAST, output_dir=tmp_path, callbacks=[snapshot])
    assert result.losses[0] == pytest.approx(math.log(2.0), abs=1e-3)  # π_ref = the incoming adapter
    assert snapshot.begin and set(snapshot.begin) == set(snapshot.end)
    assert all(torch.equal(snapshot.begin[k], snapshot.end[k]) for k in snapshot.begin)
    assert list(result.model.peft_config) == ["default"]  # the helper "ref" adapter is removed afterwards


def test_bad_pairs_are_config_errors(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    with pytest.raises(ConfigError, match="at least one"):
        train_dpo(model, tokenizer, [], FAST, output_dir=tmp_path)
    with pytest.raises(ConfigError, match="rejected"):
        train_dpo(model, tokenizer, [{"prompt": "p", "chosen": "c"}], FAST, output_dir=tmp_path)
