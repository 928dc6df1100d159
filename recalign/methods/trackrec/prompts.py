"""TrackRec's prompts (docs/systems/trackrec.md): the CTR Yes/No question, the CoT prompt and the validator prompt.

Every step of TrackRec (distillation SFT, G sampling, S-DPO, greedy regeneration, V scoring and V Rec-tuning)
renders its messages through `render` below: one system prompt and the tokenizer's own chat template
(`recalign.llm.prompts.render_prompt`). The original trained S-DPO with a different (safe-rlhf) template than SFT
and generation (docs/systems/trackrec.md, defect 5); here the text a model is trained on is exactly the text it is
asked.

- CTR prompt (three parts, TALLRec style): the user's profile, the rated history ("'Heat', 5 stars; ..."), the
  question whether the user will like the candidate.
- CoT prompt: the same with the question replaced by the 200-word preference-summary instruction (no candidate).
- V prompt: the CTR prompt + the CoT between `<summary>` and `</summary>` + "Only output the result (Yes or No)."
  The Rec-tuning line is in every V prompt (scoring and tuning), so V is scored on the text it is tuned on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from recalign.llm.prompts import PromptTemplate, register_template, render_prompt

__all__ = ["SYSTEM", "CtrSample", "CTR_TEMPLATE", "COT_TEMPLATE", "VALIDATOR_TEMPLATE", "profile_text",
           "history_text", "ctr_messages", "cot_messages", "validator_messages", "validator_answer", "render",
           "parse_answer"]

SYSTEM = "You are a helpful assistant."
SUMMARY_LINE = ("A summary of the user's preferences is given between <summary> and </summary>; consider it and "
                "the history to predict.")
REC_TUNING_LINE = "Only output the result (Yes or No)."
PROFILE_AND_HISTORY = "{profile}\nThe user rated these {noun}s (oldest first): {history}\n"  # line 1-2 of every prompt
CTR_QUESTION = "Will the user like the {noun} '{candidate}'? Answer Yes or No."  # line 3 of the CTR prompt

CTR_TEMPLATE = register_template(PromptTemplate(
    name="trackrec_ctr",
    system=SYSTEM,
    user=PROFILE_AND_HISTORY + CTR_QUESTION,
    answer="{answer}",
    description="TrackRec CTR question: profile, rated history, candidate -> Yes/No",
))

COT_TEMPLATE = register_template(PromptTemplate(
    name="trackrec_cot",
    system=SYSTEM,
    user=PROFILE_AND_HISTORY + "Please summarize the user's {noun} watch preference within 200 words.",
    answer="{cot}",
    description="TrackRec CoT prompt: profile and rated history -> a preference summary (the RecCoT)",
))

VALIDATOR_TEMPLATE = register_template(PromptTemplate(
    name="trackrec_validator",
    system=SYSTEM,
    user=(PROFILE_AND_HISTORY + CTR_QUESTION + "\n"
          + f"{SUMMARY_LINE}\n<summary>{{cot}}</summary>\n{REC_TUNING_LINE}"),
    answer="{answer}",
    description="TrackRec validator V: the CTR question + the CoT as a summary -> Yes/No",
))


@dataclass(frozen=True)
class CtrSample:
    """One impression as the prompts see it: user features, rated history (oldest first) and the candidate."""

    candidate: str
    history: Sequence[tuple[str, float | None]] = ()
    profile: Mapping[str, object] = field(default_factory=dict)
    noun: str = "movie"


def profile_text(profile: Mapping[str, object]) -> str:
    """'The user's profile: gender M, age 25, occupation writer.' (features in their given order)."""
    parts = [f"{key} {value}" for key, value in profile.items() if value is not None and str(value) != ""]
    return "The user's profile: " + ", ".join(parts) + "." if parts else "The user's profile is unknown."


def _stars(rating: float | None) -> str:
    if rating is None or (isinstance(rating, float) and math.isnan(rating)):
        return ""
    value = int(rating) if float(rating).is_integer() else rating
    return f", {value} star" + ("" if value == 1 else "s")


def history_text(history: Sequence[tuple[str, float | None]]) -> str:
    """"'Heat', 5 stars; 'Casino', 4 stars" (ratings left out where unknown); 'none' for an empty history."""
    return "; ".join(f"'{title}'{_stars(rating)}" for title, rating in history) or "none"


def _fields(sample: CtrSample) -> dict[str, str]:
    return {"profile": profile_text(sample.profile), "history": history_text(sample.history),
            "candidate": sample.candidate, "noun": sample.noun}


def ctr_messages(sample: CtrSample) -> list[dict[str, str]]:
    """Chat messages of the CTR Yes/No question."""
    return CTR_TEMPLATE.messages(**_fields(sample))


def cot_messages(sample: CtrSample) -> list[dict[str, str]]:
    """Chat messages of the CoT (preference summary) prompt: the CTR prompt with the summary instruction."""
    return COT_TEMPLATE.messages(**_fields(sample))


def validator_messages(sample: CtrSample, cot: str) -> list[dict[str, str]]:
    """Chat messages of the validator prompt: the CTR question with `cot` as the summary."""
    return VALIDATOR_TEMPLATE.messages(**_fields(sample), cot=cot.strip())


def validator_answer(label: int) -> str:
    """V's Rec-tuning target: "Yes" for a liked item (label 1), "No" otherwise."""
    return "Yes" if int(label) == 1 else "No"


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The one chat template of every TrackRec step (SFT, sampling, S-DPO, scoring, Rec-tuning)."""
    return render_prompt(tokenizer, messages)


def parse_answer(text: str) -> int | None:
    """1 for an answer starting with 'yes', 0 for 'no' (case-insensitive, after spaces); None when unparsable."""
    word = text.strip().split(maxsplit=1)[0].strip(".,!:;\"'").lower() if text.strip() else ""
    return {"yes": 1, "no": 0}.get(word)
