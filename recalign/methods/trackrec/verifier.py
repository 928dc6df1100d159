"""The validator's score s = σ(log p_Yes − log p_No) (recalign's rule; docs/systems/trackrec.md, Formulas).

p_Yes and p_No are read from the FULL next-token distribution (a log-softmax over the whole vocabulary) at the first
answer position: the position right after the chat-rendered prompt, whose assistant turn is open. Nothing is read
from a top-k list and nothing defaults to 1e-9, so s spans (0, 1); the original's softmax over probabilities
squashed it into [σ(−1), σ(1)] = [0.269, 0.731] (docs/systems/trackrec.md, defect 2).

Yes/No token ids are looked up in the tokenizer, never hard-coded (defect 1). The rule (`answer_token_ids`): each
surface form in `YES_FORMS` / `NO_FORMS` ("Yes", " Yes", "yes", " yes", "YES" and the same for No) is encoded
without special tokens; a form that is exactly one token contributes that id, a form that splits into several
tokens is skipped (its first piece, e.g. "Y", is not an answer). p_Yes is the total probability of the Yes ids
(a log-sum-exp of their log-probs), p_No likewise. A tokenizer with no one-token Yes or No form is an error, and
so is an id that would count for both.

V's answer (`VerifierOutput.answers`) is its greedy first token: 1 when the argmax of that distribution is a Yes
id, 0 when a No id, None (unparsable, counted wrong by the LLM test) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from recalign.errors import ConfigError

__all__ = ["YES_FORMS", "NO_FORMS", "answer_token_ids", "score_from_logits", "VerifierOutput", "verifier_scores"]

YES_FORMS = ("Yes", " Yes", "yes", " yes", "YES")
NO_FORMS = ("No", " No", "no", " no", "NO")


def _single_token_ids(tokenizer, forms: Sequence[str]) -> list[int]:
    """The ids of the forms that are one known token (a word-level vocabulary maps unknown forms to its unknown
    token, which is no answer)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for form in forms:
        encoded = tokenizer.encode(form, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] != unknown:
            ids.append(int(encoded[0]))
    return sorted(set(ids))


def answer_token_ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(Yes ids, No ids): every surface form of `YES_FORMS` / `NO_FORMS` that is a single token."""
    yes, no = _single_token_ids(tokenizer, YES_FORMS), _single_token_ids(tokenizer, NO_FORMS)
    if not yes or not no:
        raise ConfigError(f"verifier: the tokenizer has no single-token form of {'Yes' if not yes else 'No'} "
                          f"(tried {YES_FORMS if not yes else NO_FORMS})")
    if set(yes) & set(no):
        raise ConfigError(f"verifier: token ids {sorted(set(yes) & set(no))} count as both Yes and No")
    return torch.tensor(yes, dtype=torch.long), torch.tensor(no, dtype=torch.long)


def score_from_logits(logits: torch.Tensor, yes_ids: torch.Tensor, no_ids: torch.Tensor) -> torch.Tensor:
    """s = σ(log p_Yes − log p_No) per row of next-token `logits` [B, V] (p over the full vocabulary)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    log_yes = torch.logsumexp(logp[:, yes_ids.to(logp.device)], dim=-1)
    log_no = torch.logsumexp(logp[:, no_ids.to(logp.device)], dim=-1)
    return torch.sigmoid(log_yes - log_no)


@dataclass
class VerifierOutput:
    """Scores s ∈ (0, 1) [N] and V's greedy answers (1 Yes, 0 No, None unparsable), in input order."""

    scores: torch.Tensor
    answers: list[int | None]

    @property
    def valid_ratio(self) -> float:
        """Share of answers that are Yes or No."""
        return sum(a is not None for a in self.answers) / max(1, len(self.answers))


def verifier_scores(model, tokenizer, prompts: Sequence[str], batch_size: int = 8) -> VerifierOutput:
    """s and V's greedy answer for each chat-rendered prompt: one forward pass per left-padded batch."""
    if batch_size < 1:
        raise ConfigError("verifier batch_size must be >= 1")
    yes_ids, no_ids = answer_token_ids(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    scores = torch.empty(len(encoded))
    top = torch.empty(len(encoded), dtype=torch.long)
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # the last column is every row's first answer position
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                batch = tokenizer.pad({"input_ids": [encoded[i] for i in index]}, return_tensors="pt", padding=True)
                mask = batch["attention_mask"].to(device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
                logits = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=positions,
                               logits_to_keep=1).logits[:, -1, :]  # only the answer position's [B, V] logits
                scores[index] = score_from_logits(logits, yes_ids, no_ids).cpu()
                top[index] = logits.argmax(dim=-1).cpu()
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    is_yes, is_no = torch.isin(top, yes_ids), torch.isin(top, no_ids)
    answers = [1 if y else (0 if n else None) for y, n in zip(is_yes.tolist(), is_no.tolist())]
    return VerifierOutput(scores=scores, answers=answers)
