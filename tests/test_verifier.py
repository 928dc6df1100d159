"""The validator score s = σ(log p_Yes − log p_No) on the full next-token distribution (systems.md §2.3)."""

from __future__ import annotations

import math

import pytest
import torch

from recalign.errors import ConfigError
from recalign.methods.trackrec.verifier import answer_token_ids, score_from_logits, verifier_scores

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


def test_score_against_hand_computed_logits():
    yes, no = torch.tensor([1]), torch.tensor([2])
    logits = torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0],     # p_Y/p_N = e^2 -> σ(2)
                           [0.0, 0.0, 0.0, 5.0, 5.0],     # Yes and No equally unlikely -> 0.5
                           [0.0, -1.0, 1.0, 3.0, 0.0]])   # log p_Y − log p_N = −2 -> σ(−2)
    s = score_from_logits(logits, yes, no)
    expected = torch.tensor([1 / (1 + math.exp(-2)), 0.5, 1 / (1 + math.exp(2))])
    assert torch.allclose(s, expected, atol=1e-6)
    assert s[0].item() == pytest.approx(0.880797, abs=1e-6)


def test_score_sums_every_yes_variant():
    # ids 1 and 3 are both Yes forms: p_Y = (e + e) / Z, p_N = e^-1 / Z -> log ratio = ln 2 + 2
    s = score_from_logits(torch.tensor([[0.0, 1.0, -1.0, 1.0, 0.0]]), torch.tensor([1, 3]), torch.tensor([2]))
    assert s.item() == pytest.approx(2 * math.e ** 2 / (2 * math.e ** 2 + 1), abs=1e-6)  # 0.936534


def test_score_is_not_squashed_into_the_originals_range():
    # A confident verifier: p_Y ≈ 1, p_N ≈ 0. The original σ(p_Y − p_N) could never leave [0.269, 0.731].
    logits = torch.full((2, 6), -10.0)
    logits[0, 1], logits[1, 2] = 10.0, 10.0
    s = score_from_logits(logits, torch.tensor([1]), torch.tensor([2]))
    assert s[0].item() > 0.999 and s[1].item() < 0.001
    probabilities = torch.softmax(logits, dim=-1)
    original = torch.sigmoid(probabilities[:, 1] - probabilities[:, 2])
    assert 0.268 < original.min().item() and original.max().item() < 0.732


def test_yes_no_ids_are_looked_up_in_the_tokenizer():
    from recalign.llm.models import smollm2_tokenizer

    yes, no = answer_token_ids(smollm2_tokenizer(progress=False))
    # SmolLM2: "Yes" 10539, " Yes" 9230, "yes" 10407, " yes" 9805 ("YES" is two tokens and is skipped);
    # "No" 5230, " No" 2838, "no" 4607, " no" 787, "NO" 13465.
    assert yes.tolist() == [9230, 9805, 10407, 10539]
    assert no.tolist() == [787, 2838, 4607, 5230, 13465]


class _SplitTokenizer:
    """Every word splits into characters: no single-token Yes."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_a_tokenizer_without_single_token_answers_is_an_error():
    with pytest.raises(ConfigError, match="single-token form of Yes"):
        answer_token_ids(_SplitTokenizer())


def test_batched_left_padded_scores_equal_one_prompt_at_a_time():
    from recalign.llm.models import tiny_model
    from recalign.llm.prompts import render_prompt

    model, tokenizer = tiny_model(seed=3)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": text}])
               for text in ("Will the user like 'Heat'?", "A much longer question about 'Casino', 5 stars; "
                            "'Heat', 4 stars; 'Fargo', 2 stars. Yes or No?", "Short?")]
    out = verifier_scores(model, tokenizer, prompts, batch_size=3)
    yes, no = answer_token_ids(tokenizer)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, :]
        assert out.scores[i].item() == pytest.approx(score_from_logits(logits, yes, no).item(), abs=1e-5)
        top = int(logits.argmax())
        assert out.answers[i] == (1 if top in yes.tolist() else 0 if top in no.tolist() else None)
    assert 0.0 <= out.valid_ratio <= 1.0
