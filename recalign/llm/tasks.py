"""Recommendation tasks for LLMs: rows from a Dataset + split, prompt/completion examples, and the answer parser.

A *row* is (user, history item ids oldest first, target item id, optional next items, optional candidates).
A *task* turns a row into chat messages (through the one template registry, `recalign.llm.prompts`) and into the
completion the model should write. Tasks:

- `SeqRecTask` (BIGRec-style): history titles -> the next item's title (k = 1), or a numbered list of the next
  k titles (k > 1).
- `RankingTask`: history titles + a shuffled candidate list (target + sampled negatives) -> the chosen title.

The registry is open: anything that follows the `Task` protocol (`row_messages`, `row_completion`, `train_rows`,
`eval_rows`) is registered with `register_task(kind, factory)` and found with `get_task(kind, **options)`; rows carry
optional control categories, candidates and labels for tasks that need them (controllable rec, yes/no, CoT).

`parse_titles` turns a model's answer back into titles and survives malformed output (empty, no quotes, no
numbering, chatter around the list, unicode, very long text).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError
from recalign.llm.prompts import PromptTemplate, get_template, numbered, quoted, render_prompt

# ---- rows --------------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Next-item rows: users [R], histories (item ids, oldest first), targets [R], and optional extras per row."""

    users: np.ndarray
    histories: list[list[int]]
    targets: np.ndarray
    next_items: list[list[int]] | None = None   # the target and the items after it (list answers)
    candidates: list[list[int]] | None = None   # ranking: a shuffled candidate list containing the target
    categories: list[str | None] | None = None  # control tasks: the requested category per row, e.g. "+Fantasy"
    labels: list[Any] | None = None             # label tasks (yes/no, rating, CoT text): the expected label per row

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: Sequence[int] | np.ndarray) -> "Rows":
        """The rows at `index`, in that order (every optional per-row field follows)."""
        index = np.asarray(index, dtype=np.int64)
        pick = (lambda xs: None if xs is None else [xs[i] for i in index])
        return Rows(self.users[index], [self.histories[i] for i in index], self.targets[index],
                    pick(self.next_items), pick(self.candidates), pick(self.categories), pick(self.labels))


def rows_from_sequences(sequences: Sequence[Sequence[int]], max_history: int = 10, rows_per_sequence: int = 1,
                        min_history: int = 1, n_next: int = 1, users: Sequence[int] | None = None) -> Rows:
    """Rows cut from item sequences: the last `rows_per_sequence` positions with >= `min_history` items before.

    The history is the (at most `max_history`) items before the position; `next_items` the item there and up to
    `n_next - 1` after it.
    """
    if max_history < 1 or rows_per_sequence < 1 or min_history < 1 or n_next < 1:
        raise ConfigError("max_history, rows_per_sequence, min_history and n_next must all be >= 1")
    out_users, histories, targets, nexts = [], [], [], []
    for index, seq in enumerate(sequences):
        seq = list(seq)
        first = max(min_history, len(seq) - rows_per_sequence)
        for pos in range(first, len(seq)):
            out_users.append(index if users is None else users[index])
            histories.append([int(i) for i in seq[max(0, pos - max_history):pos]])
            targets.append(int(seq[pos]))
            nexts.append([int(i) for i in seq[pos:pos + n_next]])
    return Rows(np.asarray(out_users, dtype=np.int64), histories, np.asarray(targets, dtype=np.int64), nexts)


def train_rows(dataset, split, max_history: int = 10, rows_per_user: int = 1, n_next: int = 1) -> Rows:
    """Rows from what precedes the valid part (train, + train2 when present): each user's last positions."""
    seqs = dataset.sequences(split.history("valid"))
    users = np.flatnonzero(seqs.lengths() >= 2)
    return rows_from_sequences([seqs[u] for u in users], max_history, rows_per_user, 1, n_next, users=users)


def eval_rows(dataset, split, part: str = "test", max_history: int = 10, n_next: int = 1) -> Rows:
    """One row per user with an item in `part`: history = `split.history(part)`, target = the user's first item."""
    frame = split.part(part).sort_values(["user_id", "timestamp"], kind="stable")
    users = frame["user_id"].drop_duplicates().to_numpy().astype(np.int64)
    history = dataset.sequences(split.history(part))
    future = dataset.sequences(frame)
    return Rows(users, [history[u][-max_history:].tolist() for u in users],
                np.asarray([future[u][0] for u in users], dtype=np.int64),
                [future[u][:n_next].tolist() for u in users])


def sample_rows(rows: Rows, n: int | None, seed: int) -> Rows:
    """n rows drawn without replacement (all of them, shuffled, when n is None or >= len(rows))."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return rows.take(order if n is None else order[:n])


def add_candidates(rows: Rows, n_items: int, n_negatives: int, seed: int) -> Rows:
    """Rows with a shuffled candidate list each: the target + `n_negatives` items outside history and target."""
    import torch

    from recalign.data.dataset import UserSequences
    from recalign.data.sampling import sample_negatives

    lengths = np.fromiter((len(h) for h in rows.histories), dtype=np.int64, count=len(rows))
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    items = np.fromiter((i for h in rows.histories for i in h), dtype=np.int64, count=int(lengths.sum()))
    history = UserSequences(indptr=indptr, items=items, n_items=n_items)
    exclude = torch.as_tensor(rows.targets, dtype=torch.long)[:, None]
    negatives = sample_negatives(n_items, history, np.arange(len(rows)), n_negatives, seed, exclude=exclude).numpy()
    pool = np.concatenate([rows.targets[:, None], negatives], axis=1)
    order = np.random.default_rng(seed).random(pool.shape).argsort(axis=1)  # a seeded shuffle per row
    shuffled = np.take_along_axis(pool, order, axis=1)
    return dataclasses.replace(rows, candidates=shuffled.tolist())


# ---- tasks ---------------------------------------------------------------------------------------------------


@runtime_checkable
class Task(Protocol):
    """What a task must do: one row -> chat messages and the expected completion; rows from a dataset + split."""

    kind: str

    def row_messages(self, rows: Rows, index: int, titles: Sequence[str]) -> list[dict[str, str]]:
        """Chat messages (system/user turns) for row `index`."""
        ...

    def row_completion(self, rows: Rows, index: int, titles: Sequence[str]) -> str:
        """The answer the model should write for row `index` (EOS is appended by the trainer)."""
        ...

    def train_rows(self, dataset, split) -> Rows:
        """Training rows from the split's train part."""
        ...

    def eval_rows(self, dataset, split, part: str = "test", seed: int = 0) -> Rows:
        """Evaluation rows of `part`."""
        ...


class TitleTask:
    """Mixin for tasks written as `row_titles` + `messages(history, candidates)` + `completion(titles)`."""

    def row_messages(self, rows: Rows, index: int, titles: Sequence[str]) -> list[dict[str, str]]:
        """Chat messages for row `index`, from its history (and candidate) titles."""
        history, _, candidates = self.row_titles(rows, index, titles)
        return self.messages(history, candidates)

    def row_completion(self, rows: Rows, index: int, titles: Sequence[str]) -> str:
        """The answer naming row `index`'s answer titles."""
        return self.completion(self.row_titles(rows, index, titles)[1])



class SeqRecTask(TitleTask, BaseModel):
    """History titles -> the next item's title (k = 1) or a numbered list of the next k titles."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["seqrec"] = "seqrec"
    max_history: int = Field(10, ge=1, description="most recent history titles in a prompt")
    k: int = Field(1, ge=1, description="titles per answer: 1 = one quoted title, >1 = a numbered list")
    rows_per_user: int = Field(1, ge=1, description="train rows per user: the last positions of the train sequence")

    def template(self) -> PromptTemplate:
        """The registered template of this task."""
        return get_template("seqrec" if self.k == 1 else "seqrec_list")

    def messages(self, history: Sequence[str], candidates: Sequence[str] | None = None) -> list[dict[str, str]]:
        """Chat messages for one row (history titles, oldest first)."""
        return self.template().messages(history=quoted(history[-self.max_history:]), k=self.k)

    def completion(self, titles: Sequence[str]) -> str:
        """The answer naming `titles` (the target first; k = 1 uses only the target)."""
        if self.k == 1:
            return self.template().completion(title=titles[0])
        return self.template().completion(titles=numbered(titles[: self.k]))

    def row_titles(self, rows: Rows, index: int, titles: Sequence[str]) -> tuple[list[str], list[str], None]:
        """(history titles, answer titles, candidate titles) of row `index`."""
        answer = rows.next_items[index] if rows.next_items is not None else [int(rows.targets[index])]
        return [titles[i] for i in rows.histories[index]], [titles[i] for i in answer], None

    def train_rows(self, dataset, split) -> Rows:
        """SFT rows from the train part (see `train_rows`)."""
        return train_rows(dataset, split, self.max_history, self.rows_per_user, n_next=self.k)

    def eval_rows(self, dataset, split, part: str = "test", seed: int = 0) -> Rows:
        """Evaluation rows of `part` (one per user)."""
        return eval_rows(dataset, split, part, self.max_history, n_next=self.k)


class RankingTask(TitleTask, BaseModel):
    """History titles + a numbered candidate list (target + sampled negatives, shuffled) -> the chosen title."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["ranking"] = "ranking"
    max_history: int = Field(10, ge=1, description="most recent history titles in a prompt")
    n_candidates: int = Field(20, ge=2, description="candidates per prompt, the target included")
    rows_per_user: int = Field(1, ge=1, description="train rows per user")

    def template(self) -> PromptTemplate:
        """The registered template of this task."""
        return get_template("ranking")

    def messages(self, history: Sequence[str], candidates: Sequence[str] | None = None) -> list[dict[str, str]]:
        """Chat messages for one row."""
        if not candidates:
            raise ConfigError("ranking task: every row needs a candidate list")
        return self.template().messages(history=quoted(history[-self.max_history:]), candidates=numbered(candidates))

    def completion(self, titles: Sequence[str]) -> str:
        """The answer naming the chosen candidate."""
        return self.template().completion(title=titles[0])

    def row_titles(self, rows: Rows, index: int, titles: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
        """(history titles, answer titles, candidate titles) of row `index`."""
        if rows.candidates is None:
            raise ConfigError("ranking task: rows have no candidates (use add_candidates)")
        return ([titles[i] for i in rows.histories[index]], [titles[int(rows.targets[index])]],
                [titles[i] for i in rows.candidates[index]])

    def train_rows(self, dataset, split, seed: int = 0) -> Rows:
        """SFT rows with candidate lists."""
        rows = train_rows(dataset, split, self.max_history, self.rows_per_user)
        return add_candidates(rows, dataset.n_items, self.n_candidates - 1, seed)

    def eval_rows(self, dataset, split, part: str = "test", seed: int = 0) -> Rows:
        """Evaluation rows of `part` with candidate lists."""
        rows = eval_rows(dataset, split, part, self.max_history)
        return add_candidates(rows, dataset.n_items, self.n_candidates - 1, seed)


TaskFactory = Callable[..., Task]
TASKS: dict[str, TaskFactory] = {}


def register_task(kind: str, factory: TaskFactory | None = None, *, replace: bool = False):
    """Register a task factory (a class or function taking options) under `kind`; usable as a decorator.

    Re-registering a kind is an error unless `replace` (so two tasks never silently share a name).
    """
    def add(task_factory: TaskFactory) -> TaskFactory:
        if not kind or not isinstance(kind, str):
            raise ConfigError("register_task: kind must be a non-empty string")
        if kind in TASKS and TASKS[kind] is not task_factory and not replace:
            raise ConfigError(f"LLM task {kind!r} is already registered")
        TASKS[kind] = task_factory
        return task_factory

    return add if factory is None else add(factory)


def task_kinds() -> list[str]:
    """Every registered task kind, sorted."""
    return sorted(TASKS)


def get_task(kind: str, **options: Any) -> Task:
    """A registered task by kind with its options (unknown kinds and bad options are config errors)."""
    from pydantic import ValidationError

    if kind not in TASKS:
        raise ConfigError(f"unknown LLM task {kind!r}; choose one of: {', '.join(task_kinds())}")
    try:
        task = TASKS[kind](**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or kind
        raise ConfigError(f"LLM task {kind!r}: {where}: {first.get('msg', 'invalid value')}") from None
    if not isinstance(task, Task):
        raise ConfigError(f"LLM task {kind!r}: {type(task).__name__} does not implement the Task protocol")
    return task


register_task("seqrec", SeqRecTask)
register_task("ranking", RankingTask)


# ---- examples --------------------------------------------------------------------------------------------------


def prompts_for(task: Task, rows: Rows, titles: Sequence[str], tokenizer) -> list[str]:
    """The rendered prompt string of every row (chat template applied, assistant turn open)."""
    return [render_prompt(tokenizer, task.row_messages(rows, index, titles)) for index in range(len(rows))]


def sft_examples(task: Task, rows: Rows, titles: Sequence[str], tokenizer) -> list[dict[str, str]]:
    """{prompt, completion} per row: the rendered prompt and the answer text (EOS is appended by the trainer)."""
    prompts = prompts_for(task, rows, titles, tokenizer)
    return [{"prompt": prompt, "completion": task.row_completion(rows, i, titles)} for i, prompt in enumerate(prompts)]


def to_hf_dataset(examples: list[dict]):
    """A Hugging Face `datasets.Dataset` from a list of example dicts."""
    from datasets import Dataset as HFDataset

    if not examples:
        raise ConfigError("no examples: the split produced no rows for this task")
    return HFDataset.from_list(examples)


def build_sft_dataset(task: Task, dataset, split, tokenizer, part: str = "train", max_rows: int | None = None,
                      seed: int = 0):
    """A prompt/completion `datasets.Dataset` for `part` ('train' or an evaluation part), seeded subsample."""
    rows = task.train_rows(dataset, split) if part == "train" else task.eval_rows(dataset, split, part, seed)
    rows = sample_rows(rows, max_rows, seed)
    return to_hf_dataset(sft_examples(task, rows, dataset.titles(), tokenizer))


# ---- parsing answers ---------------------------------------------------------------------------------------------

_QUOTED = re.compile(r'"([^"\n]*)"|“([^”\n]*)”|«([^»\n]*)»')
_NUMBERED = re.compile(r"^\s*(?:#?\d{1,3}\s*[.):\]-]|\(\d{1,3}\)|[-*•·])\s*")
_INLINE_NUMBER = re.compile(r"\s+(?=\d{1,3}[.)]\s)")
_EDGE = " \t\"'“”«»`*_"
MAX_TITLE_CHARS = 300
MAX_TITLES = 100


def _answer_lines(text: str) -> list[str]:
    """The non-empty lines of an answer, a numbered line holding several numbers ("1. A 2. B") split at each."""
    lines = []
    for line in text.splitlines():
        if _NUMBERED.match(line) and _INLINE_NUMBER.search(line):  # "1. A 2. B" on one line
            lines.extend(_INLINE_NUMBER.split(line))
        else:
            lines.append(line)
    return [line for line in lines if line.strip()]


def parse_titles(text: str | None, k: int | None = None) -> list[str]:
    """The titles an answer names, in order (repeats kept; at most k, and at most 100).

    Quoted titles win: when any line holds a "quoted" title, only quoted titles (and a numbered line whose closing
    quote was cut off) count, so chatter around the list is ignored. Otherwise numbered/bulleted lines are titles,
    and with neither quotes nor numbering every non-empty line is one. Titles are cut at 300 characters.
    """
    if not text:
        return []
    limit = MAX_TITLES if k is None else min(k, MAX_TITLES)
    lines = _answer_lines(text)
    any_quotes = any(_QUOTED.search(line) for line in lines)
    any_numbers = any(_NUMBERED.match(line) for line in lines)
    titles: list[str] = []
    for line in lines:
        found = [next(g for g in m.groups() if g is not None) for m in _QUOTED.finditer(line)]
        if found:
            titles.extend(found)
        elif any_quotes:
            # An unterminated quote after a number ('3. "Dune' cut by max_new_tokens) still names a title.
            if _NUMBERED.match(line) or line.lstrip().startswith(('"', "“", "«")):
                titles.append(_NUMBERED.sub("", line, count=1))
        elif any_numbers:
            if _NUMBERED.match(line):
                titles.append(_NUMBERED.sub("", line, count=1))
        else:
            titles.append(line)
        if len(titles) >= limit:
            break
    cleaned = [t.strip().strip(_EDGE).strip()[:MAX_TITLE_CHARS] for t in titles[:limit]]
    return [t for t in cleaned if t]


def titles_final(text: str, n: int) -> bool:
    """Whether the first n titles of an answer that begins with `text` are already decided, whatever follows.

    The decided part is every complete line (up to the last newline) plus, on the unfinished line, everything up
    to its last closing plain quote, when that line has no curly or angle quotes (whose pairs a later character
    could still change) and its last piece holds only closed plain quotes. When that part holds a quoted title
    and parses into at least n titles, no continuation changes them (a later line cannot change a complete
    line's titles nor the quoted mode; closed plain quotes stay pairs), so `parse_titles(text + more)` and
    `parse_titles(text + more, k)` (k <= n) start with the same n titles. The early stop of
    `recalign.llm.fastgen` (`stop_after_titles`) rests on this.
    """
    decided = _decided_prefix(text)
    if not decided or not any(_QUOTED.search(line) for line in _answer_lines(decided)):
        return False
    return len(parse_titles(decided)) >= n


def _decided_prefix(text: str) -> str:
    """The complete lines of `text`, plus the unfinished line up to its last closing plain quote when safe."""
    complete = text[:text.rfind("\n") + 1]
    tail = text[len(complete):]
    if any(c in tail for c in "“”«»\r") or '"' not in tail:
        return complete
    cut = tail[:tail.rfind('"') + 1]
    pieces = _answer_lines(cut)
    if not pieces or pieces[-1].count('"') % 2 or '"' not in pieces[-1]:
        return complete
    return complete + cut


def parse_title(text: str | None) -> str:
    """The first title of an answer, or "" when it names none."""
    titles = parse_titles(text, 1)
    return titles[0] if titles else ""
