"""S-DPO (softmax-DPO, systems.md §1.1): per-sample log-sum-exp, equal to DPO with one negative, and its trainer."""

from __future__ import annotations

import math

import pytest
import torch

from recalign.errors import ConfigError
from recalign.methods.trackrec.sdpo import (SDPOConfig, dpo_losses, sdpo_loss, sdpo_losses, select_preferences,
                               sequence_logprobs, train_sdpo)

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


def test_one_negative_equals_sigmoid_dpo():
    chosen = torch.tensor([0.5, -1.0, 2.0])
    rejected = torch.tensor([[1.0], [-3.0], [0.0]])
    got = sdpo_losses(chosen, rejected, beta=0.1)
    assert torch.allclose(got, dpo_losses(chosen, rejected[:, 0], beta=0.1), atol=1e-7)
    # by hand: −log σ(0.1·(0.5 − 1.0)) = log(1 + e^0.05) = log(2.0512711) = 0.7184597
    assert got[0].item() == pytest.approx(math.log(1 + math.exp(0.05)), abs=1e-6)
    assert got[0].item() == pytest.approx(0.7184597, abs=1e-6)


def test_per_sample_log_sum_exp_on_a_hand_computed_batch():
    # β = 1. Sample A: Δw = 0, negatives Δ = 0, ln 3 -> Σ exp(Δj − Δw) = 1 + 3 = 4 -> L = log(1 + 4) = ln 5.
    # Sample B: Δw = ln 2, negatives Δ = 0, 0 -> Σ = ½ + ½ = 1 -> L = log(1 + 1) = ln 2.
    chosen = torch.tensor([0.0, math.log(2)])
    rejected = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    losses = sdpo_losses(chosen, rejected, beta=1.0)
    assert losses.tolist() == pytest.approx([math.log(5), math.log(2)], abs=1e-6)
    assert sdpo_loss(chosen, rejected, beta=1.0).item() == pytest.approx(math.log(10) / 2, abs=1e-6)  # 1.151293
    # The original pooled the log-sum-exp over the batch: log(1 + (4 + 1)) = ln 6 = 1.791759, not ln(10)/2.
    pooled = -torch.nn.functional.logsigmoid(-torch.logsumexp((rejected - chosen.unsqueeze(1)).flatten(), 0))
    assert pooled.item() == pytest.approx(math.log(6), abs=1e-6)
    assert abs(pooled.item() - sdpo_loss(chosen, rejected, beta=1.0).item()) > 0.5


def test_masked_padding_negatives_do_not_count():
    chosen = torch.tensor([0.0, math.log(2)])
    padded = torch.tensor([[0.0, math.log(3)], [0.0, 99.0]])
    mask = torch.tensor([[True, True], [True, False]])
    # sample B has the one negative Δ = 0: Σ = ½ -> L = log(1.5)
    assert sdpo_losses(chosen, padded, 1.0, mask).tolist() == pytest.approx([math.log(5), math.log(1.5)], abs=1e-6)


def test_select_preferences_best_chosen_and_seeded_negatives_from_the_rest():
    rewards = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.8, 0.1, 0.2, 0.7]])
    chosen, negatives = select_preferences(rewards, 2, torch.Generator().manual_seed(0))
    assert chosen.tolist() == [1, 0]
    assert negatives.shape == (2, 2)
    for row in range(2):
        assert chosen[row].item() not in negatives[row].tolist()
        assert len(set(negatives[row].tolist())) == 2
    again = select_preferences(rewards, 2, torch.Generator().manual_seed(0))[1]
    assert torch.equal(negatives, again)
    _, capped = select_preferences(rewards, 9, torch.Generator().manual_seed(0))
    assert sorted(capped[0].tolist()) == [0, 2, 3]  # k = n − 1: every other answer
    with pytest.raises(ConfigError):
        select_preferences(torch.tensor([[0.3], [0.4]]), 1, torch.Generator())


def test_sequence_logprobs_batched_equals_one_at_a_time():
    from recalign.llm.models import tiny_model

    model, _ = tiny_model(seed=1)
    pairs = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15]), ([3, 4, 5, 6, 7, 8], [2])]
    with torch.no_grad():
        batched = sequence_logprobs(model, pairs)
        for row, (prompt, completion) in enumerate(pairs):
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + completion])).logits[0], -1)
            by_hand = sum(logp[len(prompt) - 1 + t, token].item() for t, token in enumerate(completion))
            assert batched[row].item() == pytest.approx(by_hand, abs=1e-4)


def test_train_sdpo_raises_the_chosen_answer_against_its_negatives(tmp_path):
    from recalign.llm.models import tiny_model
    from recalign.llm.trainer import LoraConfig, attach_lora

    model, tokenizer = tiny_model(seed=0)
    model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    samples = [{"prompt": "user: summarize\nassistant: ", "chosen": "likes dark thrillers",
                "rejected": ["likes cartoons", "hates films"]},
               {"prompt": "user: describe\nassistant: ", "chosen": "enjoys old westerns",
                "rejected": ["enjoys nothing"]}]

    def margin() -> float:
        enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        with torch.no_grad():
            p = enc(samples[0]["prompt"])
            lp = sequence_logprobs(model, [(p, enc(c) + [tokenizer.eos_token_id])
                                           for c in [samples[0]["chosen"], *samples[0]["rejected"]]])
        return float(lp[0] - lp[1:].max())

    before = margin()
    result = train_sdpo(model, tokenizer, samples, SDPOConfig(learning_rate=5e-3, max_steps=6, batch_size=2,
                                                                warmup_ratio=0.0), output_dir=tmp_path)
    assert margin() > before + 0.1
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]
    assert result.losses[0] == pytest.approx(sum([math.log(3), math.log(2)]) / 2, abs=0.05)  # π = π_ref at step 1
    assert "sdpo_accuracies" in result.summary()


def test_bad_samples_are_config_errors(tmp_path):
    from recalign.llm.models import tiny_model

    model, tokenizer = tiny_model(seed=0)
    with pytest.raises(ConfigError, match="non-empty list"):
        train_sdpo(model, tokenizer, [{"prompt": "p", "chosen": "a", "rejected": "b"}], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="at least one sample"):
        train_sdpo(model, tokenizer, [], output_dir=tmp_path)
