"""RecLM-gen's controllable-recommendation tasks (docs/systems/reclmgen.md, steps 3-5): rows, prompts and labels.

Every row is a plain `Rows` whose `labels[i]` is the row's `ControlRequest` (task, requested count k, control category
C, percentage p and target count m); `categories[i]` is the signed request ("+Drama", "-Drama") and `candidates[i]`
the choice list of a "select from" or ranking row. An item is "in C" when C is among its categories.

- **SFT** (`sft_rows(source, epoch, seed)`), regenerated every epoch from a generator seeded by (seed, epoch): a
  random history position (the train sequence; validation and test items are never seen) with a random 1..10-item
  window before it, and labels from the teacher: SeqRec (k ~ U{1..10}, target + teacher top-k, half "select from"
  10 candidates), +C / -C PersonalControlRec (50/50), PersonalCategoryRate LP / MP / EP (percent or count wording),
  ControlRec without history (k = 1) with its reverse "What is the category of ..." question one time in three.
- **RL** (`rl_rows(source, episode, seed)`): SeqRec, +C, -C, LP, MP, EP once per user per episode, k ~ U{6..10}.
- **Test** (`build_test_rows(base, task, ...)`): SeqRec, +C (the target's category), -C and LP 20% (the most frequent
  category of the model's own SeqRec answer that excludes the target), EP / MP 30% (the target's category),
  ItemCount (k in 11..15) and SeqRanking (target + 100 negatives).

The teacher is anything with `topk(histories, k, *, users=None, candidates=None, categories=None,
exclude_history=True) -> LongTensor [B, k]` (categories[i] = "+C", "-C" or None; -1 = no item) and
`ranks(histories, candidates, users=None)`; every teacher call is batched over all rows of a task.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError
from recalign.llm.prompts import (
    PromptTemplate,
    get_template,
    numbered,
    quoted,
    register_template,
)
from recalign.llm.tasks import Rows, add_candidates, eval_rows, register_task
from recalign.methods.reclmgen.metrics import CategoryTable, control_inputs

RANK_TASKS = ("seqrec", "itemcount", "ranking")
CONTROL_TASKS = ("+c", "-c", "lp", "mp", "ep")
SFT_ONLY_TASKS = ("control_re", "category_re")
RULE_OF = {"lp": "LP", "mp": "MP", "ep": "EP"}
SFT_TASKS = ("seqrec", "control", "category_rate", "control_re")
RL_TASKS = ("seqrec", "+c", "-c", "lp", "mp", "ep")
TEST_TASKS = ("seqrec", "+c", "-c", "lp_20", "ep_30", "mp_30", "itemcount", "ranking")
RL_VALID_TASKS = ("seqrec", "+c", "-c", "lp_20", "mp_30", "ep_50", "itemcount")


@dataclass(frozen=True)
class ControlRequest:
    """One row's request: task, k, control category C, percent p (or None), target count m, wording."""

    task: str
    k: int
    category: str | None = None
    p: int | None = None
    m: int | None = None
    count_wording: bool = False   # "at most 3 items" instead of "at most 30%"
    variant: int = 0              # which intention wording
    select: bool = False          # SeqRec "select from" candidates
    sign: str = "+"               # ControlRec without history: ask for C (+) or for anything but C (-)
    answer_categories: tuple[str, ...] = ()  # the reverse question's answer: the item's categories

    @property
    def rule(self) -> str | None:
        """LP / MP / EP for category-rate rows, else None."""
        return RULE_OF.get(self.task)


# ---- prompt templates ------------------------------------------------------------------------------------------

_LIST = "Answer with a numbered list of {k} titles in double quotes, one per line, best first."
_HISTORY = "The user has enjoyed these items, oldest first: {history}\n"
POSITIVE = ('I like "{category}" items.', 'Please recommend only "{category}" items.',
            'I am in the mood for something "{category}".')
NEGATIVE = ('Please exclude any "{category}" item.', 'I do not want "{category}" items.',
            'Nothing "{category}", please.')
RATE = {"lp": "at most {amount} should be \"{category}\"",
        "mp": "at least {amount} should be \"{category}\"",
        "ep": "exactly {amount} should be \"{category}\""}

TEMPLATES = {t.name: t for t in (
    PromptTemplate("reclm_seqrec", _HISTORY + "Recommend {k} different items the user may like next. " + _LIST,
                   "{titles}", description="RecLM-gen SeqRec: history -> k next items"),
    PromptTemplate("reclm_seqrec_select", _HISTORY + "Choose {k} items the user may like next from these "
                   "candidates:\n{candidates}\n" + _LIST, "{titles}",
                   description="RecLM-gen SeqRec / SeqRanking: history + candidates -> k of them"),
    PromptTemplate("reclm_control", _HISTORY + "{intention} Recommend {k} different items. " + _LIST, "{titles}",
                   description="RecLM-gen +C / -C PersonalControlRec"),
    PromptTemplate("reclm_category_rate", _HISTORY + "Recommend {k} different items; {rate}. " + _LIST,
                   "{titles}", description="RecLM-gen PersonalCategoryRate (LP / MP / EP)"),
    PromptTemplate("reclm_item_control", "{intention} Recommend one item. " + _LIST, "{titles}",
                   description="RecLM-gen ControlRec without history (k = 1)"),
    PromptTemplate("reclm_category_question", 'What is the category of "{title}"?', "{answer}",
                   description="RecLM-gen reverse ControlRec question"),
)}
for _template in TEMPLATES.values():
    register_template(_template)


def spec_messages(spec: ControlRequest, history: Sequence[str], candidates: Sequence[str] | None,
                  answer: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages of a row with request `spec` (history / candidate / answer titles)."""
    hist = quoted(history, sep=" → ")
    if spec.task == "category_re":
        return get_template("reclm_category_question").messages(title=answer[0])
    if spec.task == "control_re":
        intention = (POSITIVE if spec.sign == "+" else NEGATIVE)[spec.variant % 3]
        return get_template("reclm_item_control").messages(intention=intention.format(category=spec.category), k=1)
    if spec.task in ("+c", "-c"):
        intention = (POSITIVE if spec.task == "+c" else NEGATIVE)[spec.variant % 3]
        return get_template("reclm_control").messages(history=hist, k=spec.k,
                                                      intention=intention.format(category=spec.category))
    if spec.task in RULE_OF:
        amount = f"{spec.m} of the {spec.k} items" if spec.count_wording else f"{spec.p}% of the items"
        rate = RATE[spec.task].format(amount=amount, category=spec.category)
        return get_template("reclm_category_rate").messages(history=hist, k=spec.k, rate=rate)
    if spec.select or spec.task == "ranking":
        if not candidates:
            raise ConfigError(f"control task {spec.task!r}: the row has no candidates")
        return get_template("reclm_seqrec_select").messages(history=hist, k=spec.k, candidates=numbered(candidates))
    return get_template("reclm_seqrec").messages(history=hist, k=spec.k)


def spec_completion(spec: ControlRequest, answer: Sequence[str]) -> str:
    """The answer text of a row: a numbered list of quoted titles, or the reverse question's sentence."""
    if spec.task == "category_re":
        return f'The category of "{answer[0]}" is {quoted(spec.answer_categories)}.'
    return numbered(answer)


# ---- where rows come from ---------------------------------------------------------------------------------------

@dataclass
class ControlSource:
    """Train sequences (oldest first) per user, the category table and the teacher that labels rows."""

    users: np.ndarray
    sequences: list[list[int]]
    categories: CategoryTable
    teacher: Any
    max_history: int = 10

    def __post_init__(self) -> None:
        if len(self.users) != len(self.sequences) or any(len(s) < 2 for s in self.sequences):
            raise ConfigError("controllable rows: one sequence per user, each with at least 2 items")
        if self.max_history < 1:
            raise ConfigError("controllable rows: max_history must be >= 1")

    @classmethod
    def from_split(cls, dataset, split, teacher, max_history: int = 10) -> "ControlSource":
        """Each user's sequence before the validation part (the last two items never appear in SFT/RL rows)."""
        seqs = dataset.sequences(split.history("valid"))
        users = np.flatnonzero(seqs.lengths() >= 2)
        return cls(users.astype(np.int64), [seqs[u].tolist() for u in users],
                   CategoryTable.from_item_categories(dataset.item_categories()), teacher, max_history)

    @property
    def n_items(self) -> int:
        """Catalog size."""
        return self.categories.n_items


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> np.random.Generator:
    """The generator of one epoch: the same (seed, epoch) always gives the same rows."""
    return np.random.default_rng([int(seed), int(epoch), int(salt)])


def sample_positions(source: ControlSource, rng: np.random.Generator) -> Rows:
    """One row per user: a random target position >= 1 and a random 1..max_history window before it."""
    lengths = np.array([len(s) for s in source.sequences], dtype=np.int64)
    pos = rng.integers(1, lengths)                     # target index in 1..len-1
    window = rng.integers(1, np.minimum(pos, source.max_history) + 1)
    histories = [s[p - w:p] for s, p, w in zip(source.sequences, pos, window)]
    targets = np.array([s[p] for s, p in zip(source.sequences, pos)], dtype=np.int64)
    return Rows(source.users.copy(), histories, targets)


def concat_rows(parts: Sequence[Rows]) -> Rows:
    """Rows of several tasks one after another (optional fields filled with None where a part lacks them)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Rows(np.zeros(0, dtype=np.int64), [], np.zeros(0, dtype=np.int64), [], [], [], [])
    def field(name: str) -> list:
        return [x for p in parts for x in (getattr(p, name) or [None] * len(p))]
    return Rows(np.concatenate([p.users for p in parts]), field("histories"),
                np.concatenate([p.targets for p in parts]), field("next_items"), field("candidates"),
                field("categories"), field("labels"))


def _teacher_topk(source: ControlSource, rows: Rows, k: int, signed: Sequence[str | None] | None = None
                  ) -> torch.Tensor:
    """Teacher top-k per row (history excluded), -1 where the teacher has no more items."""
    if not len(rows):
        return torch.zeros((0, k), dtype=torch.long)
    kwargs = {} if signed is None else {"categories": list(signed)}
    histories = [[int(i) for i in h] for h in rows.histories]
    top = source.teacher.topk(histories, k, users=[int(u) for u in rows.users], **kwargs)
    return torch.as_tensor(top, dtype=torch.long)


def _front(target: int, ranked: Sequence[int], k: int, target_first: bool = True) -> list[int]:
    """[target] + ranked without the target, cut to k (the ranked items as they are when not `target_first`)."""
    if not target_first:
        return [int(i) for i in ranked if int(i) >= 0][:k]
    return ([target] + [int(i) for i in ranked if int(i) >= 0 and int(i) != target])[:k]


def minus_categories(categories: CategoryTable, lists: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] the most frequent category of each list that the target does not carry (-1 when there is none).

    Ties go to the lowest category index; -1 entries are ignored.
    """
    table = categories.table
    counts = (table[lists.clamp(min=0)] & (lists >= 0)[..., None]).sum(1)   # [B, n_categories]
    counts = torch.where(table[targets.clamp(min=0)], torch.full_like(counts, -1), counts)
    best = counts.argmax(1)
    return torch.where(counts.gather(1, best[:, None])[:, 0] > 0, best, torch.full_like(best, -1))


def _candidates(rng: np.random.Generator, label: list[int], history: list[int], n_items: int, size: int = 10
                ) -> list[int]:
    """`label` + random fillers outside label and history, shuffled: a "select from" list of `size` items."""
    taken = set(label) | set(history)
    free = n_items - len(taken)
    fillers: list[int] = []
    while len(fillers) < min(size - len(label), free):
        draw = int(rng.integers(n_items))
        if draw not in taken:
            taken.add(draw)
            fillers.append(draw)
    out = np.array(label + fillers, dtype=np.int64)
    return out[rng.permutation(len(out))].tolist()


# ---- SFT tasks (step 3) -------------------------------------------------------------------------------------------

def sft_seqrec(source: ControlSource, rng: np.random.Generator) -> Rows:
    """SeqRec: k ~ U{1..10}; label = target + teacher top-k (target removed); half "select from" 10 candidates."""
    rows = sample_positions(source, rng)
    ks = rng.integers(1, 11, size=len(rows))
    select = rng.random(len(rows)) < 0.5
    top = _teacher_topk(source, rows, 11).tolist()
    labels = [_front(int(t), top[i], int(ks[i])) for i, t in enumerate(rows.targets)]
    cands = [_candidates(rng, lab, h, source.n_items) if s else None
             for lab, h, s in zip(labels, rows.histories, select)]
    specs = [ControlRequest("seqrec", len(lab), select=bool(s)) for lab, s in zip(labels, select)]
    return dataclasses.replace(rows, next_items=labels, candidates=cands, categories=[None] * len(rows),
                               labels=specs)


def sft_control(source: ControlSource, rng: np.random.Generator) -> Rows:
    """±C PersonalControlRec (50/50): +C any category, teacher top-k in C (target first if in C); -C the most frequent
    category of the teacher's top-10 that excludes the target, teacher top-k outside C."""
    rows = sample_positions(source, rng)
    n = len(rows)
    cats = source.categories
    plus = rng.random(n) < 0.5
    random_c = torch.as_tensor(rng.integers(len(cats.names), size=n))
    top10 = _teacher_topk(source, rows, 10)
    minus_c = minus_categories(cats, top10, torch.as_tensor(rows.targets))
    plus = plus | (minus_c < 0).numpy()   # a target carrying every category of the list cannot be excluded
    column = torch.where(torch.as_tensor(plus), random_c, minus_c)
    names = [cats.names[int(c)] for c in column]
    signed = [("+" if p else "-") + c for p, c in zip(plus, names)]
    ranked = _teacher_topk(source, rows, 10, signed).tolist()
    sizes = cats.sizes()[column].numpy()
    in_c = cats.contains(torch.as_tensor(rows.targets)[:, None], column)[:, 0].numpy()
    variants = rng.integers(3, size=n)
    labels, specs, kept = [], [], []
    for i in range(n):  # one row at a time: list surgery on <= 11 items
        cap = min(10, int(sizes[i])) if plus[i] else 10
        k = int(rng.integers(1, cap + 1))
        label = _front(int(rows.targets[i]), ranked[i], k, target_first=bool(plus[i] and in_c[i]))
        if label:
            kept.append(i)
            labels.append(label)
            specs.append(ControlRequest("+c" if plus[i] else "-c", len(label), names[i], variant=int(variants[i])))
    out = rows.take(kept)
    return dataclasses.replace(out, next_items=labels, candidates=[None] * len(kept),
                               categories=[signed[i] for i in kept], labels=specs)


def sft_category_rate(source: ControlSource, rng: np.random.Generator) -> Rows:
    """PersonalCategoryRate, k = 10: LP (t' in {t, t-1}), MP (t' in {t, t+1}) or EP (t' = t); label = teacher
    top-t' in C + top-(10-t') outside C, shuffled; percent (p = 10 t) or count (m = t) wording."""
    rows = sample_positions(source, rng)
    n, cats = len(rows), source.categories
    column = torch.as_tensor(rng.integers(len(cats.names), size=n))
    names = [cats.names[int(c)] for c in column]
    inside = _teacher_topk(source, rows, 10, ["+" + c for c in names]).tolist()
    outside = _teacher_topk(source, rows, 10, ["-" + c for c in names]).tolist()
    sizes = cats.sizes()[column].numpy()
    tasks = rng.choice(np.array(["lp", "mp", "ep"]), size=n)
    wording = rng.random(n) < 0.5
    labels, specs, kept = [], [], []
    for i in range(n):  # one row at a time: a handful of draws per row
        cap = min(int(sizes[i]), 10)
        task = str(tasks[i])
        if task == "lp":
            t = int(rng.integers(1, cap + 1))
            actual = t - int(rng.integers(2))
        elif task == "mp":
            t = int(rng.integers(0, cap))
            actual = t + int(rng.integers(2))
        else:
            t = int(rng.integers(0, cap + 1))
            actual = t
        ins = [x for x in inside[i] if x >= 0][:actual]
        outs = [x for x in outside[i] if x >= 0][: 10 - len(ins)]
        label = ins + outs
        if len(label) < 10 or len(ins) != actual:
            continue  # the teacher ran out of items (tiny catalogs): the request cannot be labelled truthfully
        kept.append(i)
        labels.append([label[j] for j in rng.permutation(10)])
        specs.append(ControlRequest(task, 10, names[i], p=10 * t, m=t, count_wording=bool(wording[i])))
    out = rows.take(kept)
    return dataclasses.replace(out, next_items=labels, candidates=[None] * len(kept),
                               categories=["+" + specs[j].category for j in range(len(kept))], labels=specs)


def sft_control_re(source: ControlSource, rng: np.random.Generator, max_items: int | None = None) -> Rows:
    """ControlRec without history: one row per item (k = 1, label = the item) asking for one of its categories (+)
    or one it lacks (-); one row in three is the reverse question "What is the category of X?"."""
    table = source.categories.table
    items = torch.nonzero(table.any(1)).flatten().numpy()
    items = items[rng.permutation(len(items))]
    if max_items is not None:
        items = items[:max_items]
    reverse = rng.random(len(items)) < 1 / 3
    plus = rng.random(len(items)) < 0.5
    specs, signed = [], []
    for item, rev, p in zip(items, reverse, plus):  # one item at a time: category draws per item
        own = torch.nonzero(table[item]).flatten().numpy()
        other = torch.nonzero(~table[item]).flatten().numpy()
        if rev:
            names = tuple(source.categories.names[int(c)] for c in own)
            specs.append(ControlRequest("category_re", 1, answer_categories=names))
            signed.append(None)
            continue
        p = bool(p) or other.size == 0
        c = source.categories.names[int(rng.choice(own if p else other))]
        specs.append(ControlRequest("control_re", 1, c, variant=int(rng.integers(3)), sign="+" if p else "-"))
        signed.append(("+" if p else "-") + c)
    n = len(items)
    return Rows(np.full(n, -1, dtype=np.int64), [[] for _ in range(n)], items.astype(np.int64),
                [[int(i)] for i in items], [None] * n, signed, specs)


SFT_BUILDERS = {"seqrec": sft_seqrec, "control": sft_control, "category_rate": sft_category_rate,
                "control_re": sft_control_re}


def sft_rows(source: ControlSource, epoch: int, seed: int = 0, tasks: Sequence[str] = SFT_TASKS,
             max_items: int | None = None) -> Rows:
    """The SFT rows of one epoch: every task in `tasks`, each from its own generator seeded by (seed, epoch)."""
    unknown = [t for t in tasks if t not in SFT_BUILDERS]
    if unknown:
        raise ConfigError(f"controllable SFT tasks: unknown {unknown}; expected some of {list(SFT_BUILDERS)}")
    parts = []
    for salt, task in enumerate(SFT_BUILDERS):
        if task in tasks:
            rng = epoch_generator(seed, epoch, salt)
            parts.append(sft_control_re(source, rng, max_items) if task == "control_re"
                         else SFT_BUILDERS[task](source, rng))
    return concat_rows(parts)


# ---- RL tasks (step 4) --------------------------------------------------------------------------------------------

def target_categories(categories: CategoryTable, targets: torch.Tensor, rng: np.random.Generator | None = None
                      ) -> torch.Tensor:
    """[B] a category of each target (-1 when it has none): a random one of its categories (rng), else the last in
    sorted order (for Amazon's nested category paths, the most specific one, as the original's category[-1])."""
    table = categories.table[targets.clamp(min=0)]
    if rng is None:
        last = table.shape[1] - 1 - table.flip(1).to(torch.int8).argmax(1)
        return torch.where(table.any(1), last, torch.full_like(last, -1))
    noise = torch.as_tensor(rng.random(table.shape))
    pick = torch.where(table, noise, torch.full_like(noise, -1.0)).argmax(1)
    return torch.where(table.any(1), pick, torch.full_like(pick, -1))


def rl_rows(source: ControlSource, episode: int, seed: int = 0, tasks: Sequence[str] = RL_TASKS,
            percents: Sequence[int] = (10, 20, 30, 40, 50)) -> Rows:
    """The RL rows of one episode: each task once per user, k ~ U{6..10}; +C / MP / EP use a category of the target,
    -C / LP the most frequent category of the teacher's top-10 without the target; m = floor(p k / 100)."""
    unknown = [t for t in tasks if t not in RL_TASKS]
    if unknown:
        raise ConfigError(f"controllable RL tasks: unknown {unknown}; expected some of {list(RL_TASKS)}")
    parts = []
    for salt, task in enumerate(RL_TASKS):
        if task not in tasks:
            continue
        rng = epoch_generator(seed, episode, 100 + salt)
        rows = sample_positions(source, rng)
        ks = rng.integers(6, 11, size=len(rows))
        p = rng.choice(np.asarray(percents), size=len(rows))
        targets = torch.as_tensor(rows.targets)
        if task in ("-c", "lp"):
            column = minus_categories(source.categories, _teacher_topk(source, rows, 10), targets)
        elif task == "seqrec":
            column = torch.full((len(rows),), -1, dtype=torch.long)
        else:
            column = target_categories(source.categories, targets, rng)
        keep = np.flatnonzero((column >= 0).numpy() | (task == "seqrec"))
        specs, signed = [], []
        for i in keep:  # one spec per row
            name = None if int(column[i]) < 0 else source.categories.names[int(column[i])]
            k = int(ks[i])
            rate = task in RULE_OF
            specs.append(ControlRequest(task, k, name, p=int(p[i]) if rate else None,
                                     m=int(p[i]) * k // 100 if rate else None, variant=int(rng.integers(3))))
            signed.append(None if name is None else ("-" if task == "-c" else "+") + name)
        out = rows.take(keep)
        parts.append(dataclasses.replace(out, next_items=[[int(t)] for t in out.targets],
                                         candidates=[None] * len(keep), categories=signed, labels=specs))
    return concat_rows(parts)


# ---- test tasks (step 5) ------------------------------------------------------------------------------------------

def parse_test_task(task: str) -> tuple[str, int | None]:
    """(kind, percent) of a test task name: "seqrec", "+c", "-c", "itemcount", "ranking" or "lp_20", "mp_30", ..."""
    match = re.fullmatch(r"(lp|mp|ep)_(\d{1,3})", task)
    if match and 0 <= int(match.group(2)) <= 100:
        return match.group(1), int(match.group(2))
    if task in ("seqrec", "+c", "-c", "itemcount", "ranking"):
        return task, None
    raise ConfigError(f"controllable test task {task!r}: expected one of {list(TEST_TASKS)} "
                      "(or lp_P / mp_P / ep_P with a percentage P)")


def build_test_rows(base: Rows, task: str, categories: CategoryTable, seed: int = 0, *,
                    seqrec_lists: torch.Tensor | None = None, teacher: Any = None, n_negatives: int = 100) -> Rows:
    """The rows of test task `task` (TEST_TASKS, or lp_P / mp_P / ep_P) over `base` (history = last 10 items,
    target = final); k = 10 (11..15 for ItemCount), m = floor(P k / 100).

    -C and LP need the model's own SeqRec answers `seqrec_lists` [U, W] (grounded ids, < 0 = none); a row whose
    answer names no category without the target falls back to the teacher's top-10 (when a teacher is given), else
    to the catalog's most frequent category without the target. +C, MP and EP use the target's category. A row left
    without a category (a target with no category, or one carrying every category for -C) cannot state the request
    and is left out of that task.
    """
    kind, p = parse_test_task(task)
    n = len(base)
    targets = torch.as_tensor(base.targets, dtype=torch.long)
    rng = np.random.default_rng([int(seed), sum(task.encode())])
    rows, column = base, torch.full((n,), -1, dtype=torch.long)
    ks = np.full(n, 10)
    if kind in ("-c", "lp"):
        if seqrec_lists is None:
            raise ConfigError(f"controllable test task {task!r}: needs the model's SeqRec answers (run seqrec first)")
        column = minus_categories(categories, torch.as_tensor(seqrec_lists, dtype=torch.long), targets)
        column = _fill_minus(categories, base, targets, column, teacher)
    elif kind in ("+c", "ep", "mp"):
        column = target_categories(categories, targets)
    elif kind == "itemcount":
        ks = rng.integers(11, 16, size=n)
    elif kind == "ranking":
        rows = add_candidates(base, categories.n_items, n_negatives, seed)
    names = [None if int(c) < 0 else categories.names[int(c)] for c in column]
    specs = [ControlRequest(kind, int(k), name, p=p, m=None if p is None else p * int(k) // 100)
             for k, name in zip(ks, names)]
    signed = [None if c is None else ("-" if kind == "-c" else "+") + c for c in names]
    out = dataclasses.replace(rows, categories=signed, labels=specs,
                              candidates=rows.candidates if kind == "ranking" else [None] * n)
    if kind in CONTROL_TASKS:  # a request without a category cannot be written: the row sits this task out
        out = out.take(np.flatnonzero((column >= 0).numpy()))
    return out


def rl_validation_rows(base: Rows, categories: CategoryTable, teacher: Any, seed: int = 0) -> Rows:
    """The RL step's validation mix on `base` (e.g. the validation part): SeqRec, +C, -C, LP_20, MP_30, EP_50,
    ItemCount; -C and LP take their category from the teacher's top-10."""
    histories = [[int(i) for i in h] for h in base.histories]
    top = torch.as_tensor(teacher.topk(histories, 10, users=[int(u) for u in base.users]), dtype=torch.long)
    return concat_rows([build_test_rows(base, task, categories, seed, seqrec_lists=top, teacher=teacher)
                        for task in RL_VALID_TASKS])


def metric_inputs(rows: Rows, grounded: torch.Tensor, categories: CategoryTable, *,
                  n_outputs: torch.Tensor | None = None, sr_grounded: torch.Tensor | None = None,
                  parity: str | None = None):
    """The `control` metric inputs (recalign.methods.reclmgen.metrics) of test rows and their grounded answers [U, >= max k]."""
    specs = [ControlTask._spec(rows, i) for i in range(len(rows))]
    column = [-1 if s.category is None else categories.index(s.category) for s in specs]
    rules = [s.rule for s in specs]
    has_rule = any(r is not None for r in rules)
    has_category = any(c >= 0 for c in column)
    has_candidates = rows.candidates is not None and all(c is not None for c in rows.candidates)
    return control_inputs(
        grounded, rows.targets, [s.k for s in specs], categories.n_items, n_outputs=n_outputs, history=rows.histories,
        categories=categories if has_category else None, row_category=column if has_category else None,
        rule=rules if has_rule else None, m=[s.m or 0 for s in specs] if has_rule else None,
        sr_grounded=sr_grounded if has_category else None,
        candidates=rows.candidates if has_candidates else None, parity=parity)


def _fill_minus(categories: CategoryTable, base: Rows, targets: torch.Tensor, column: torch.Tensor, teacher
                ) -> torch.Tensor:
    """-C for rows whose own answer gave none: the teacher's top-10, else the most frequent catalog category."""
    missing = torch.nonzero(column < 0).flatten()
    if missing.numel() and teacher is not None:
        sub = base.take(missing.numpy())
        histories = [[int(i) for i in h] for h in sub.histories]
        top = torch.as_tensor(teacher.topk(histories, 10, users=[int(u) for u in sub.users]), dtype=torch.long)
        column[missing] = minus_categories(categories, top, targets[missing])
    missing = torch.nonzero(column < 0).flatten()
    if missing.numel():
        sizes = categories.sizes().expand(missing.numel(), -1).clone()
        sizes[categories.table[targets[missing]]] = -1
        best = sizes.argmax(1)
        column[missing] = torch.where(sizes.gather(1, best[:, None])[:, 0] > 0, best, torch.full_like(best, -1))
    return column


# ---- registered tasks ---------------------------------------------------------------------------------------------

class ControlTask(BaseModel):
    """Renders any controllable row (its `ControlRequest` in `rows.labels`) as chat messages and an answer."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "reclm_sft"
    max_history: int = Field(10, ge=1, description="most recent history titles in a prompt")
    seed: int = Field(0, description="seed of the per-epoch row generator")

    def row_messages(self, rows: Rows, index: int, titles: Sequence[str]) -> list[dict[str, str]]:
        """Chat messages for row `index`."""
        spec = self._spec(rows, index)
        history = [titles[i] for i in rows.histories[index][-self.max_history:]]
        cands = rows.candidates[index] if rows.candidates is not None else None
        answer = [titles[i] for i in (rows.next_items[index] if rows.next_items else [int(rows.targets[index])])]
        return spec_messages(spec, history, None if cands is None else [titles[i] for i in cands], answer)

    def row_completion(self, rows: Rows, index: int, titles: Sequence[str]) -> str:
        """The label answer of row `index`."""
        answer_ids = rows.next_items[index] if rows.next_items else [int(rows.targets[index])]
        return spec_completion(self._spec(rows, index), [titles[i] for i in answer_ids])

    @staticmethod
    def _spec(rows: Rows, index: int) -> ControlRequest:
        spec = rows.labels[index] if rows.labels is not None else None
        if not isinstance(spec, ControlRequest):
            raise ConfigError("controllable task: rows need a ControlRequest label per row")
        return spec

    def train_rows(self, dataset, split, teacher: Any = None, epoch: int = 0) -> Rows:
        """SFT rows of `epoch` (labels from `teacher`)."""
        if teacher is None:
            raise ConfigError(f"LLM task {self.kind!r}: training rows need a teacher")
        return sft_rows(ControlSource.from_split(dataset, split, teacher, self.max_history), epoch, self.seed)

    def eval_rows(self, dataset, split, part: str = "test", seed: int = 0) -> Rows:
        """SeqRec test rows of `part` (the other test tasks derive from them with `build_test_rows`)."""
        cats = CategoryTable.from_item_categories(dataset.item_categories())
        return build_test_rows(eval_rows(dataset, split, part, self.max_history), "seqrec", cats, seed)


class ControlRLTask(ControlTask):
    """The RL task mix (step 4); `train_rows(..., epoch)` gives one episode."""

    kind: Literal["reclm_rl"] = "reclm_rl"

    def train_rows(self, dataset, split, teacher: Any = None, epoch: int = 0) -> Rows:
        """RL rows of episode `epoch`."""
        if teacher is None:
            raise ConfigError(f"LLM task {self.kind!r}: RL rows need a teacher")
        return rl_rows(ControlSource.from_split(dataset, split, teacher, self.max_history), epoch, self.seed)


class ControlTestTask(ControlTask):
    """One test task (step 5; `task`: seqrec, +c, -c, lp_20, ep_30, mp_30, itemcount, ranking)."""

    kind: Literal["reclm_test"] = "reclm_test"
    task: str = Field("seqrec", description="seqrec, +c, -c, lp_20, ep_30, mp_30, itemcount, ranking (or lp_P ...)")

    def model_post_init(self, context: Any) -> None:
        """Check the task name early (a config error naming the choices)."""
        parse_test_task(self.task)

    def eval_rows(self, dataset, split, part: str = "test", seed: int = 0, *, seqrec_lists: torch.Tensor | None = None,
                  teacher: Any = None) -> Rows:
        """The rows of this test task on `part` (-C and LP need the model's SeqRec answers `seqrec_lists`)."""
        cats = CategoryTable.from_item_categories(dataset.item_categories())
        return build_test_rows(eval_rows(dataset, split, part, self.max_history), self.task, cats, seed,
                               seqrec_lists=seqrec_lists, teacher=teacher)


register_task("reclm_sft", ControlTask)
register_task("reclm_rl", ControlRLTask)
register_task("reclm_test", ControlTestTask)
