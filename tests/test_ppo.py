"""Our PPO (recalign.methods.reclmgen.ppo): GAE, losses and statistics on hand-computed numbers; the value head is trained,
saved and reloaded; PPO raises a toy reward on a tiny random Llama; a run killed mid-way resumes to the same numbers."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("peft")

from recalign.errors import ConfigError  # noqa: E402
from recalign.methods.reclmgen.ppo import (ACTOR, CRITIC, LOOP, STATE_FILE, VALUE_HEAD_FILE, PPOConfig, PPOTrainer,  # noqa: E402
                              RunningMoments, approx_kl, clipped_policy_loss, clipped_value_loss,
                              entropy_from_logits, gae, kl_penalized_rewards, masked_whiten,
                              rewards_on_last_token)
from recalign.checkpoints import IterationStore  # noqa: E402

PROMPTS = [f"p{i} :" for i in range(8)]
from conftest import toy_policy  # noqa: E402

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

TARGET = "w3"  # the toy reward: +1 when the answer's first token is w3


# ---- pure pieces ---------------------------------------------------------------------------------------------

def test_gae_on_a_four_step_toy():
    # row 0: reward 1 at the end; row 1: two real tokens, then padding whose rewards/values must be ignored
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2], [1.0, 1.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, gamma=0.9, lam=0.8, mask=mask)
    # row 0 by hand (γλ = 0.72): δ3 = 1 − 0.2 = 0.8; δ2 = 0.9·0.2 − 0.3 = −0.12; δ1 = 0.9·0.3 − 0.4 = −0.13;
    # δ0 = 0.9·0.4 − 0.5 = −0.14; A3 = 0.8, A2 = −0.12 + 0.72·0.8 = 0.456, A1 = −0.13 + 0.72·0.456 = 0.19832,
    # A0 = −0.14 + 0.72·0.19832 = 0.0027904
    # row 1: δ1 = 2 − 1 = 1 (terminal after it); δ0 = 1 + 0.9·1 − 1 = 0.9; A0 = 0.9 + 0.72·1 = 1.62
    expected_adv = torch.tensor([[0.0027904, 0.19832, 0.456, 0.8], [1.62, 1.0, 0.0, 0.0]])
    expected_ret = torch.tensor([[0.5027904, 0.59832, 0.756, 1.0], [2.62, 2.0, 0.0, 0.0]])
    assert torch.allclose(advantages, expected_adv, atol=1e-6)
    assert torch.allclose(returns, expected_ret, atol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_monte_carlo():
    rewards = torch.tensor([[0.5, 0.0, -1.0, 2.0]])
    values = torch.tensor([[0.3, -0.2, 0.7, 0.1]])
    advantages, returns = gae(rewards, values, gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[1.5, 1.0, 1.0, 2.0]]))  # rewards-to-go
    assert torch.allclose(advantages, returns - values)


def test_per_token_reward_is_scaled_reward_minus_kl_penalty():
    task = torch.tensor([[0.0, 0.0, 2.0, 9.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(task, logp, ref, mask, kl_coef=0.3, scale=2.0)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0, 0.0])
    # r = R / 2 − 0.3·kl: [0 − 0.15, 0 + 0.3, 1 − 0, padding 0]
    assert rewards[0].tolist() == pytest.approx([-0.15, 0.3, 1.0, 0.0])


def test_clipped_policy_loss_on_hand_numbers():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 3.0]])
    old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th token is padding
    loss = clipped_policy_loss(ratios.log(), old, advantages, mask, clip_range=0.2)
    # −min(ρA, clip(ρ)A): −min(1.5, 1.2) = −1.2; −min(−0.5, −0.8) = 0.8; −min(2.2, 2.2) = −2.2; mean −2.6/3
    assert loss.item() == pytest.approx(-2.6 / 3, abs=1e-6)


def test_clipped_value_loss_on_hand_numbers():
    values = torch.tensor([[1.0, 0.0, 2.0, 50.0]])
    old = torch.tensor([[0.5, 0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss = clipped_value_loss(values, old, returns, mask, value_clip=0.2)
    # V_clip = [0.7, 0.3, 2.0]; max((V − R)², (V_clip − R)²) = [max(1, 1.69), max(0, 0.09), max(1, 1)]
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 1.0) / 3, abs=1e-6)


def test_approx_kl_entropy_whiten_and_running_std():
    ratios = torch.tensor([[1.5, 0.5, 1.1]])
    kl = approx_kl(ratios.log(), torch.zeros(1, 3), torch.ones(1, 3))
    expected = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5)) + (0.1 - math.log(1.1))) / 3
    assert kl.item() == pytest.approx(expected, abs=1e-6)
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    white = masked_whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert white.tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0], abs=1e-4)
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    assert (moments.mean, moments.count) == (pytest.approx(3.0), 5)
    assert moments.std == pytest.approx(math.sqrt(2.0))  # population std of 1..5
    assert RunningMoments().std == 1.0  # nothing seen yet: dividing by it changes nothing


def test_rewards_on_last_token():
    placed = rewards_on_last_token([2.0, 0.5], [[5, 6, 7], [8]])
    assert [r.tolist() for r in placed] == [[0.0, 0.0, 2.0], [0.5]]


# ---- on a tiny random Llama ------------------------------------------------------------------------------------

def toy_reward(tokenizer):
    """+1 on the last token when the answer starts with TARGET, else 0 (list-only placement)."""
    target = tokenizer.convert_tokens_to_ids(TARGET)

    def reward_fn(prompts, responses, response_ids):
        return rewards_on_last_token([1.0 if ids and ids[0] == target else 0.0 for ids in response_ids],
                                     response_ids)

    return reward_fn


def target_probability(trainer: PPOTrainer) -> float:
    """The actor's mean p(TARGET first | prompt) over PROMPTS at temperature 1 (the exact expected toy reward)."""
    tokenizer = trainer.tokenizer
    batch = tokenizer(PROMPTS, add_special_tokens=False, return_tensors="pt")  # every prompt is 2 tokens
    trainer._activate(ACTOR)
    with torch.no_grad():
        logits = trainer.model(**batch).logits[:, -1]
    return float(torch.softmax(logits, -1)[:, tokenizer.convert_tokens_to_ids(TARGET)].mean())


TOY = PPOConfig(samples=3, max_new_tokens=3, learning_rate=1e-2, kl_coef=0.05, mini_batch_size=32,
                  target_kl=None, device="cpu", seed=0)


def _weights(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    out.update({f"value_head.{k}": v.detach().clone() for k, v in trainer.value_head.state_dict().items()})
    return out


def test_value_head_is_trained_saved_and_reloaded(tmp_path):
    model, tokenizer = toy_policy()
    settings = TOY.model_copy(update={"ppo_epochs": 1})
    trainer = PPOTrainer(model, tokenizer, settings)
    head_before = {k: v.clone() for k, v in trainer.value_head.state_dict().items()}
    store = IterationStore(tmp_path / "work", fingerprint="value-head")
    result = trainer.train(PROMPTS, toy_reward(tokenizer), 1, store=store, progress=False)
    assert result.records[0]["updates"] == 1  # 32 answers, one mini-batch of 32, one epoch
    head_after = trainer.value_head.state_dict()
    assert not torch.equal(head_before["weight"], head_after["weight"])
    assert not torch.equal(head_before["bias"], head_after["bias"])

    folder = store.folder(LOOP, 1)
    for name in (f"{ACTOR}/adapter_model.safetensors", f"{CRITIC}/adapter_model.safetensors", VALUE_HEAD_FILE,
                 STATE_FILE, "metrics.json"):
        assert (folder / name).is_file(), name
    from safetensors.torch import load_file

    saved = load_file(str(folder / VALUE_HEAD_FILE))
    assert torch.equal(saved["weight"], head_after["weight"]) and torch.equal(saved["bias"], head_after["bias"])

    fresh_model, _ = toy_policy()
    fresh = PPOTrainer(fresh_model, tokenizer, settings)
    assert not torch.equal(fresh.value_head.weight, head_after["weight"])
    fresh.load(folder)
    expected, loaded = _weights(trainer), _weights(fresh)
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"]


def test_reference_is_the_model_with_adapters_disabled():
    model, tokenizer = toy_policy()
    trainer = PPOTrainer(model, tokenizer, TOY)
    trainer.train(PROMPTS, toy_reward(tokenizer), 1, progress=False)
    batch = tokenizer(PROMPTS, add_special_tokens=False, return_tensors="pt")
    plain, _ = toy_policy()  # the same seed: the base weights PPO started from
    with torch.no_grad(), trainer.model.disable_adapter():
        reference = trainer.model(**batch).logits
    assert torch.allclose(reference, plain(**batch).logits, atol=1e-6)
    assert not torch.allclose(reference, trainer.model(**batch).logits, atol=1e-4)  # the actor moved


@pytest.mark.slow
def test_ppo_raises_the_toy_reward():
    model, tokenizer = toy_policy()
    trainer = PPOTrainer(model, tokenizer, TOY)
    before = target_probability(trainer)
    result = trainer.train(PROMPTS, toy_reward(tokenizer), 15, progress=False)  # 15 × 4 = 60 updates
    after = target_probability(trainer)
    rewards = [r["mean_reward"] for r in result.records]
    assert sum(r["updates"] for r in result.records) == 60
    assert before < 0.1 and after > 0.4, (before, after)
    assert sum(rewards[:3]) / 3 < 0.2 and sum(rewards[-3:]) / 3 > 0.6, rewards
    assert all(math.isfinite(r[k]) for r in result.records for k in ("kl", "policy_loss", "value_loss"))
    summary = result.summary()
    assert summary["ppo_iterations"] == 15 and summary["ppo_mean_reward_last"] == rewards[-1]


class Killed(Exception):
    """Stands in for a kill in the middle of an iteration."""


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    settings = TOY.model_copy(update={"ppo_epochs": 2, "prompts_per_iteration": 4})
    model, tokenizer = toy_policy()
    reward_fn = toy_reward(tokenizer)
    straight = PPOTrainer(model, tokenizer, settings).train(
        PROMPTS, reward_fn, 3, store=IterationStore(tmp_path / "straight", fingerprint="toy"), progress=False)

    calls = {"n": 0}

    def dies_in_iteration_3(prompts, responses, response_ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed()
        return reward_fn(prompts, responses, response_ids)

    model, tokenizer = toy_policy()
    with pytest.raises(Killed):
        PPOTrainer(model, tokenizer, settings).train(
            PROMPTS, dies_in_iteration_3, 3, store=IterationStore(tmp_path / "killed", fingerprint="toy"),
            progress=False)
    store = IterationStore(tmp_path / "killed", fingerprint="toy")
    assert store.finished(LOOP) == [1, 2]

    model, tokenizer = toy_policy()  # a new process: fresh model, fresh trainer, the same work folder
    resumed_trainer = PPOTrainer(model, tokenizer, settings)
    resumed = resumed_trainer.train(PROMPTS, reward_fn, 3, store=store, progress=False)
    assert calls["n"] == 3  # the rerun did not redo iterations 1 and 2
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.records]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.records] == strip
    assert store.finished(LOOP) == [1, 2, 3]
    straight_weights = {n: p for n, p in straight.model.named_parameters() if "lora_" in n}
    resumed_weights = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    assert all(torch.equal(straight_weights[n], resumed_weights[n]) for n in straight_weights)
    assert torch.equal(straight.value_head.weight, resumed.value_head.weight)

    model, tokenizer = toy_policy()  # a finished run is a no-op: nothing generated or scored again
    again = PPOTrainer(model, tokenizer, settings).train(PROMPTS, dies_in_iteration_3, 3, store=store, progress=False)
    assert calls["n"] == 3 and again.records == resumed.records
    assert torch.equal(again.value_head.weight, straight.value_head.weight)


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_bad_rewards_prompts_and_model_folder_are_config_errors(tmp_path):
    model, tokenizer = toy_policy()
    trainer = PPOTrainer(model, tokenizer, TOY.model_copy(update={"samples": 0}))
    with pytest.raises(ConfigError, match="tokens but"):
        trainer.train(PROMPTS, lambda p, r, ids: [torch.zeros(len(i) + 1) for i in ids], 1, progress=False)
    with pytest.raises(ConfigError, match="rewards for"):
        trainer.train(PROMPTS, lambda p, r, ids: [], 1, progress=False)
    with pytest.raises(ConfigError, match="at least one prompt"):
        trainer.train([], toy_reward(tokenizer), 1, progress=False)
    with pytest.raises(ConfigError, match="no config.json"):
        PPOTrainer(tmp_path, tokenizer, TOY)
    with pytest.raises(ConfigError, match="no answers"):
        PPOTrainer(toy_policy()[0], tokenizer, TOY.model_copy(update={"greedy": False, "samples": 0})).train(
            PROMPTS, toy_reward(tokenizer), 1, progress=False)
