"""The one registry of chat-message templates: every prompt and answer text an LLM sees is written here.

A template is a system message (optional), a user message and an answer (the completion the model is trained to
write), each a `str.format` pattern over named fields. Tasks (`recalign.llm.tasks`) fill the fields; training,
generation, DPO and constrained decoding all render through `render_prompt` and `PromptTemplate.answer`, so the
text a model is trained on is exactly the text it is asked at inference.

Answers name items as double-quoted titles ("Title"): the quotes delimit titles for the parser and give
constrained decoding a fixed prefix/suffix around every title (`PromptTemplate.title_affixes`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Sequence

from recalign.errors import ConfigError


@dataclass(frozen=True)
class PromptTemplate:
    """System/user message patterns and the answer pattern of one task."""

    name: str
    user: str
    answer: str
    system: str | None = None
    description: str = ""
    fields: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        names = [n for text in (self.system or "", self.user) for _, n, _, _ in string.Formatter().parse(text) if n]
        object.__setattr__(self, "fields", tuple(dict.fromkeys(names)))

    def messages(self, **values: object) -> list[dict[str, str]]:
        """The chat messages with `values` filled in (every field of the template is required)."""
        missing = [n for n in self.fields if n not in values]
        if missing:
            raise ConfigError(f"prompt template {self.name!r}: missing field(s) {missing}")
        out = [] if self.system is None else [{"role": "system", "content": self.system.format(**values)}]
        out.append({"role": "user", "content": self.user.format(**values)})
        return out

    def completion(self, **values: object) -> str:
        """The answer text (without EOS: the trainers append it)."""
        return self.answer.format(**values)

    def title_affixes(self) -> tuple[str, str]:
        """(prefix, suffix) around the title in a one-title answer, for trie-constrained decoding."""
        if "{title}" not in self.answer:
            raise ConfigError(f"prompt template {self.name!r} has no single {{title}} answer")
        prefix, suffix = self.answer.split("{title}", 1)
        return prefix, suffix


def quoted(titles: Sequence[str], sep: str = ", ") -> str:
    """Titles as a double-quoted, comma-separated list: "A", "B"."""
    return sep.join(f'"{t}"' for t in titles)


def numbered(titles: Sequence[str], quote: bool = True) -> str:
    """Titles as a numbered list, one per line: 1. "A"\\n2. "B"."""
    return "\n".join(f'{i}. "{t}"' if quote else f"{i}. {t}" for i, t in enumerate(titles, 1))


SEQREC = PromptTemplate(
    name="seqrec",
    user=("Given a list of items the user recently enjoyed, please recommend a new item that the user may like. "
          "Answer with one title in double quotes.\nThe user has enjoyed: {history}"),
    answer='"{title}"',
    description="history titles (oldest first) -> the next item's title",
)

SEQREC_LIST = PromptTemplate(
    name="seqrec_list",
    user=("Given a list of items the user recently enjoyed, please recommend {k} new items that the user may like, "
          "best first. Answer with a numbered list of titles in double quotes, one per line.\n"
          "The user has enjoyed: {history}"),
    answer="{titles}",
    description="history titles -> a numbered list of k next-item titles",
)

RANKING = PromptTemplate(
    name="ranking",
    user=("The user recently enjoyed these items: {history}\nWhich one of the following candidate items will the "
          "user enjoy next? Answer with one title in double quotes.\nCandidates:\n{candidates}"),
    answer='"{title}"',
    description="history titles + a numbered candidate list -> the chosen candidate's title",
)

TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (SEQREC, SEQREC_LIST, RANKING)}


def get_template(name: str) -> PromptTemplate:
    """The registered template `name`; unknown names are config errors naming the choices."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {name!r}; choose one of: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def register_template(template: PromptTemplate) -> PromptTemplate:
    """Add a template to the registry (a method's own task); a name may be registered once."""
    if template.name in TEMPLATES and TEMPLATES[template.name] != template:
        raise ConfigError(f"prompt template {template.name!r} is already registered with other text")
    TEMPLATES[template.name] = template
    return template


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt string a model sees: the tokenizer's chat template with the assistant turn opened.

    A tokenizer without a chat template gets the plain "role: content" lines and "assistant: ".
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
