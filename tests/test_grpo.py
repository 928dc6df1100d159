"""GRPO through TRL (recalign.methods.reclmgen.grpo): the sequence reward adapter sums per-token rewards, the config is CPU-safe,
the KL reference is the adapter-disabled model (no reload from disk), and GRPO raises the toy reward."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from recalign.errors import ConfigError  # noqa: E402
from recalign.methods.reclmgen.grpo import GRPOConfig, grpo_config, sequence_reward, train_grpo  # noqa: E402

PROMPTS = [f"p{i} :" for i in range(8)]
from conftest import toy_policy  # noqa: E402

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

TARGET = "w3"


def toy_reward(tokenizer):
    """Per-token rewards: +1 on the last token when the answer starts with TARGET, else zeros."""
    target = tokenizer.convert_tokens_to_ids(TARGET)

    def reward_fn(prompts, responses, response_ids):
        out = []
        for ids in response_ids:
            reward = torch.zeros(len(ids))
            if ids and ids[0] == target:
                reward[-1] = 1.0
            out.append(reward)
        return out

    return reward_fn


def target_probability(model, tokenizer) -> float:
    """Mean p(TARGET first | prompt) over PROMPTS (temperature 1)."""
    batch = tokenizer(PROMPTS, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    return float(torch.softmax(logits, -1)[:, tokenizer.convert_tokens_to_ids(TARGET)].mean())


def test_sequence_reward_sums_the_per_token_rewards():
    seen = {}

    def reward_fn(prompts, responses, response_ids):
        seen.update(prompts=prompts, responses=responses, ids=response_ids)
        return [torch.tensor([0.5, 0.0, 1.0]), torch.tensor([-2.0]), torch.zeros(0)]

    adapter = sequence_reward(reward_fn)
    scores = adapter(prompts=["a", "b", "c"], completions=["x y z", "w", ""],
                     completion_ids=[torch.tensor([4, 5, 6]), [7], []], trainer_state=None, extra="ignored")
    assert scores == [1.5, -2.0, 0.0]
    assert seen["ids"] == [[4, 5, 6], [7], []] and seen["prompts"] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="3 answers"):
        sequence_reward(lambda p, r, i: [torch.zeros(1)])(prompts=["a"] * 3, completions=["x"] * 3,
                                                            completion_ids=[[1]] * 3)


def test_grpo_config_is_cpu_safe(tmp_path):
    settings = GRPOConfig(device="cpu", max_new_tokens=7, num_generations=4, beta=0.04, temperature=0.9)
    config = grpo_config(settings, tmp_path)
    assert config.use_cpu and not config.bf16 and not config.fp16 and not config.gradient_checkpointing
    assert (config.max_completion_length, config.num_generations, config.beta, config.temperature) == (7, 4, 0.04, 0.9)
    assert config.save_strategy == "no" and config.report_to == []


def test_kl_reference_is_the_disabled_adapter_not_a_reload(tmp_path):
    model, tokenizer = toy_policy()
    assert not model.config._name_or_path  # an in-memory model: TRL could not rebuild a reference from disk
    settings = GRPOConfig(learning_rate=1e-2, max_steps=2, batch_size=8, num_generations=8, max_new_tokens=3,
                            beta=0.04, device="cpu")
    result = train_grpo(model, tokenizer, PROMPTS, toy_reward(tokenizer), settings, output_dir=tmp_path)
    kls = [e["kl"] for e in result.log_history if "kl" in e]
    assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the 1st update
    assert list(result.model.peft_config) == ["default"]


def test_model_folder_is_loaded_in_float32(tmp_path):
    model, tokenizer = toy_policy()
    model.save_pretrained(tmp_path / "model")
    settings = GRPOConfig(max_steps=1, batch_size=8, num_generations=8, max_new_tokens=2, device="cpu")
    result = train_grpo(tmp_path / "model", tokenizer, PROMPTS, toy_reward(tokenizer), settings,
                        output_dir=tmp_path / "out")
    assert len(result.losses) == 1
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


@pytest.mark.slow
def test_grpo_raises_the_toy_reward(tmp_path):
    model, tokenizer = toy_policy()
    before = target_probability(model, tokenizer)
    settings = GRPOConfig(learning_rate=1e-2, max_steps=30, batch_size=8, num_generations=8, max_new_tokens=3,
                            device="cpu", seed=0)
    result = train_grpo(model, tokenizer, PROMPTS, toy_reward(tokenizer), settings, output_dir=tmp_path)
    rewards = result.rewards
    assert len(rewards) == 30
    assert sum(rewards[:5]) / 5 < 0.2 and sum(rewards[-5:]) / 5 > 0.6, rewards
    assert target_probability(result.model, tokenizer) > before + 0.3
    summary = result.summary()
    assert summary["grpo_reward_last"] == rewards[-1] and summary["grpo_steps"] == 30


def test_bad_input_is_a_config_error(tmp_path):
    model, tokenizer = toy_policy()
    with pytest.raises(ConfigError, match="at least one prompt"):
        train_grpo(model, tokenizer, [], toy_reward(tokenizer), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        train_grpo(tmp_path, tokenizer, PROMPTS, toy_reward(tokenizer), output_dir=tmp_path / "out")
