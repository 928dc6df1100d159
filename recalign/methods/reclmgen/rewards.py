"""RecLM-gen's rewards (docs/systems/reclmgen.md, "Formulas"; alpha = 0.5) and their placement on response tokens.

For one parsed answer (titles grounded by exact match, RecLM-gen's RL rule) of a row asking for k items:

- **Item score**: -1 (rank and task alike) when, checked in this order, idx >= k, the title is not in the catalog
  (or, for the ranking task, not among the row's candidates), the item repeats an earlier one, or it is in the
  history; otherwise rank = 1 for the target, else 1/log2(r + 3) with r the teacher's 0-based rank among all items.
- **Task score** of a valid item, with n_in / n_out the running counts of valid items inside / outside C including
  the current one: +C 1[in C]; -C 1[not in C]; LP (at most m in C): 0.5 if n_out > k - m, else 1 if not in C, else
  0.5 if n_in < m, else 0; MP (at least m): 0.5 if n_in > m, else 1 if in C, else 0.5 if n_out < k - m, else 0;
  EP (exactly m): in C -> 1[n_in <= m]; not in C -> 1 if n_in >= m, else 0.5 if n_out <= k - m, else 0.
- **Item reward**: rank (SeqRec, ItemCount, Ranking) or alpha*rank + (1-alpha)*task (control tasks).
- **List reward**: 10 * [alpha * sum_idx rank_d / B(k) + (1-alpha) * L_task], rank_d = rank / log2(idx + 2) (an
  invalid item adds -1 undiscounted), B(k) = sum_{i<k} 1 / log2(i + 2)^2; L_task = 1/log2(pos_target + 2) or 0
  (SeqRec, ItemCount, Ranking), 1/(min(k, |C|) - n_in + 1) (+C), 1/(k - n_out + 1) (-C), and 1 when the category
  rule holds (LP n_in <= m, MP n_in >= m, EP n_in = m), else 1/(|n_in - m| + 1).

Placement: fine-grained puts each item's reward on the last token of that item (tokenizer offsets of the parsed
titles, no token id hard-coded) and the list reward on the last response token; list-only puts the list reward
alone on the last token. `make_reward_fn` builds the `reward_fn(prompts, responses, response_ids)` the PPO trainer
calls, batched over every response (one grounding call, one teacher `ranks` call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from recalign.errors import ConfigError
from recalign.eval.lists import repeat_mask
from recalign.llm.grounding import ExactGrounder
from recalign.llm.tasks import Rows, parse_titles, prompts_for
from recalign.methods.reclmgen.metrics import CategoryTable
from recalign.methods.reclmgen.tasks import (
    CONTROL_TASKS,
    RANK_TASKS,
    ControlRequest,
    ControlTask,
)

ALPHA = 0.5
LIST_SCALE = 10.0
INVALID = -1.0

RewardFn = Callable[[list[str], list[str], list[list[int]]], list[torch.Tensor]]


@dataclass
class ListReward:
    """Rewards of one answer: per parsed title (`item`, `rank`, `task`), `valid` mask, and the list reward."""

    item: torch.Tensor
    rank: torch.Tensor
    task: torch.Tensor
    valid: torch.Tensor
    list_reward: float


def normaliser(k: int) -> float:
    """B(k) = sum_{i<k} 1/log2(i+2)^2: the discounted rank sum of an ideal list of k items."""
    return sum(1.0 / math.log2(i + 2) ** 2 for i in range(k))


def valid_items(items: torch.Tensor, k: int, history: Sequence[int],
                candidates: Sequence[int] | None = None) -> torch.Tensor:
    """[n] bool: idx < k, grounded (and a candidate), not a repeat of an earlier item, not in the history."""
    idx = torch.arange(items.shape[0])
    known = items >= 0
    if candidates is not None:
        known &= torch.isin(items, torch.as_tensor(list(candidates), dtype=torch.long))
    repeat = repeat_mask(items[None, :])[0]
    in_history = torch.isin(items, torch.as_tensor(list(history), dtype=torch.long)) & known
    return (idx < k) & known & ~repeat & ~in_history


def rank_scores(items: torch.Tensor, ranks: torch.Tensor, target: int, valid: torch.Tensor) -> torch.Tensor:
    """Item rank score: 1 for the target, 1/log2(r + 3) for another valid item, -1 for an invalid one."""
    score = torch.where(items == target, torch.ones_like(ranks, dtype=torch.float64),
                        1.0 / torch.log2(ranks.double() + 3))
    return torch.where(valid, score, torch.full_like(score, INVALID))


def task_scores(task: str, in_c: torch.Tensor, valid: torch.Tensor, k: int, m: int | None) -> torch.Tensor:
    """Per-item task score of a control task (+c, -c, lp, mp, ep); invalid items score -1."""
    n_in = torch.cumsum((valid & in_c).long(), 0)
    n_out = torch.cumsum((valid & ~in_c).long(), 0)
    one, half, zero = (torch.full(in_c.shape, v, dtype=torch.float64) for v in (1.0, 0.5, 0.0))
    if task == "+c":
        score = torch.where(in_c, one, zero)
    elif task == "-c":
        score = torch.where(in_c, zero, one)
    elif task == "lp":
        score = torch.where(n_out > k - m, half, torch.where(~in_c, one, torch.where(n_in < m, half, zero)))
    elif task == "mp":
        score = torch.where(n_in > m, half, torch.where(in_c, one, torch.where(n_out < k - m, half, zero)))
    elif task == "ep":
        outside = torch.where(n_in >= m, one, torch.where(n_out <= k - m, half, zero))
        score = torch.where(in_c, torch.where(n_in <= m, one, zero), outside)
    else:
        raise ConfigError(f"reward: {task!r} is not a control task; expected one of {CONTROL_TASKS}")
    return torch.where(valid, score, torch.full_like(score, INVALID))


def list_task_score(spec: ControlRequest, items: torch.Tensor, target: int, in_c: torch.Tensor, valid: torch.Tensor,
                    category_size: int) -> float:
    """L_task of the list reward for the whole answer."""
    if spec.task in RANK_TASKS:
        hit = torch.nonzero(items == target).flatten()
        return 1.0 / math.log2(int(hit[0]) + 2) if hit.numel() else 0.0
    n_in = int((valid & in_c).sum())
    n_out = int((valid & ~in_c).sum())
    if spec.task == "+c":
        return 1.0 / (min(spec.k, category_size) - n_in + 1)
    if spec.task == "-c":
        return 1.0 / (spec.k - n_out + 1)
    m = spec.m
    ok = {"lp": n_in <= m, "mp": n_in >= m, "ep": n_in == m}[spec.task]
    return 1.0 if ok else 1.0 / (abs(n_in - m) + 1)


def answer_reward(spec: ControlRequest, items: torch.Tensor, ranks: torch.Tensor, target: int, history: Sequence[int],
                  in_c: torch.Tensor | None = None, category_size: int = 0, candidates: Sequence[int] | None = None,
                  alpha: float = ALPHA) -> ListReward:
    """Item and list rewards of one answer: `items` [n] grounded ids (-1 = not in the catalog), `ranks` [n]."""
    if spec.task not in RANK_TASKS + CONTROL_TASKS:
        raise ConfigError(f"reward: task {spec.task!r} has no reward; expected one of {RANK_TASKS + CONTROL_TASKS}")
    items = torch.as_tensor(items, dtype=torch.long)
    valid = valid_items(items, spec.k, history, candidates if spec.task == "ranking" else None)
    rank = rank_scores(items, torch.as_tensor(ranks), target, valid)
    if in_c is None:
        in_c = torch.zeros_like(valid)
    idx = torch.arange(items.shape[0], dtype=torch.float64)
    rank_d = torch.where(valid, rank / torch.log2(idx + 2), rank)
    l_task = list_task_score(spec, items, target, in_c, valid, category_size)
    if spec.task in RANK_TASKS:
        task, item = torch.zeros_like(rank), rank
    else:
        task = task_scores(spec.task, in_c, valid, spec.k, spec.m)
        item = alpha * rank + (1 - alpha) * task
    list_reward = LIST_SCALE * (alpha * float(rank_d.sum()) / normaliser(spec.k) + (1 - alpha) * l_task)
    return ListReward(item.float(), rank.float(), task.float(), valid, list_reward)


# ---- placement on tokens -----------------------------------------------------------------------------------------

def title_spans(text: str, titles: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) character span of each parsed title in `text`, searched left to right."""
    spans, cursor = [], 0
    for title in titles:
        start = text.find(title, cursor)
        if start < 0:  # parse_titles only strips and cuts, so this is a defensive fallback
            start = cursor
        spans.append((start, start + len(title)))
        cursor = start + len(title)
    return spans


def token_char_ends(text: str, tokenizer, response_ids: Sequence[int] | None = None) -> torch.Tensor:
    """[n_tokens] character end of every response token in `text` (the decoded response), from offsets.

    With `response_ids`, tokens are those ids: when re-tokenizing `text` gives back the same non-special ids the
    offsets are used directly, otherwise each token's end is the length of the decoded prefix.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = torch.as_tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    if response_ids is None:
        return torch.cummax(offsets[:, 1], 0).values if len(offsets) else offsets[:, 1]
    ids = list(response_ids)
    special = set(getattr(tokenizer, "all_special_ids", []))
    plain = [j for j, t in enumerate(ids) if t not in special]
    ends = torch.zeros(len(ids), dtype=torch.long)
    if [ids[j] for j in plain] == list(enc["input_ids"]):
        ends[torch.as_tensor(plain, dtype=torch.long)] = offsets[:, 1]
    else:
        ends = torch.tensor([len(tokenizer.decode(ids[: j + 1], skip_special_tokens=True)) for j in range(len(ids))],
                            dtype=torch.long)
    return torch.cummax(ends, 0).values if len(ids) else ends


def last_tokens(char_ends: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Index of the token holding each span's last character (the first token ending at or after its end)."""
    ends = torch.as_tensor([end for _, end in spans], dtype=torch.long)
    pos = torch.searchsorted(char_ends.contiguous(), ends, side="left")
    return pos.clamp(max=max(len(char_ends) - 1, 0))


def token_rewards(response_text: str, tokenizer, item_rewards: torch.Tensor, list_reward: float = 0.0, *,
                  response_ids: Sequence[int] | None = None, titles: Sequence[str] | None = None) -> torch.Tensor:
    """FloatTensor [n_response_tokens]: item i's reward on the last token of parsed title i, list reward last."""
    ends = token_char_ends(response_text, tokenizer, response_ids)
    out = torch.zeros(len(ends), dtype=torch.float32)
    if len(ends) == 0:
        return out
    titles = parse_titles(response_text) if titles is None else list(titles)
    item_rewards = torch.as_tensor(item_rewards, dtype=torch.float32).flatten()
    if len(titles) != len(item_rewards):
        raise ConfigError(f"token_rewards: {len(item_rewards)} item rewards for {len(titles)} parsed titles")
    if titles:
        out.index_add_(0, last_tokens(ends, title_spans(response_text, titles)), item_rewards)
    out[-1] += float(list_reward)
    return out


def list_token_rewards(n_tokens: int, list_reward: float) -> torch.Tensor:
    """List-only placement: the whole reward on the last token."""
    out = torch.zeros(n_tokens, dtype=torch.float32)
    if n_tokens:
        out[-1] = float(list_reward)
    return out


# ---- the PPO reward function ------------------------------------------------------------------------------------

def make_reward_fn(rows: Rows, prompts: Sequence[str] | None, teacher, catalog_titles: Sequence[str],
                   categories: CategoryTable, tokenizer, *, alpha: float = ALPHA, fine_grained: bool = True
                   ) -> RewardFn:
    """reward_fn(prompts, responses, response_ids) -> per-token rewards, for the rows whose rendered prompts are
    `prompts` (None: rendered here with the control task's templates; rows.labels[i] is the row's `ControlRequest`);
    the teacher gives `ranks(histories, candidates, users)` (in process, or the HTTP client).
    """
    if prompts is None and rows.labels is not None:
        prompts = prompts_for(ControlTask(), rows, catalog_titles, tokenizer)
    if rows.labels is None or len(prompts) != len(rows):
        raise ConfigError("reward: rows need their ControlRequest labels and one rendered prompt per row")
    row_of = {}
    for index, prompt in enumerate(prompts):
        row_of.setdefault(prompt, index)
    grounder = ExactGrounder(catalog_titles)
    sizes = categories.sizes()

    def reward_fn(batch_prompts: list[str], responses: list[str], response_ids: list[list[int]]) -> list[torch.Tensor]:
        missing = [p for p in batch_prompts if p not in row_of]
        if missing:
            raise ConfigError(f"reward: {len(missing)} prompt(s) belong to no known row")
        index = [row_of[p] for p in batch_prompts]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
        titles = [parse_titles(t) for t in texts]
        flat = [t for ts in titles for t in ts]
        grounded = grounder.ground(flat) if flat else torch.empty(0, dtype=torch.long)
        width = max([len(ts) for ts in titles] + [1])
        items = torch.full((len(texts), width), -1, dtype=torch.long)
        lengths = torch.tensor([len(ts) for ts in titles])
        items[torch.arange(width)[None, :] < lengths[:, None]] = grounded
        # Plain lists of ints, as the teacher service (and its HTTP client) validates them; padding asks item 0.
        ranks = torch.as_tensor(teacher.ranks([[int(i) for i in rows.histories[i]] for i in index],
                                              items.clamp(min=0).tolist(), users=[int(rows.users[i]) for i in index]))
        out = []
        for b, i in enumerate(index):  # one answer at a time: a handful of titles each
            spec: ControlRequest = rows.labels[i]
            n = int(lengths[b])
            its = items[b, :n]
            in_c, size = None, 0
            if spec.category is not None:
                column = categories.index(spec.category)
                in_c = categories.contains(its[None, :], torch.tensor([column]))[0]
                size = int(sizes[column])
            cands = rows.candidates[i] if rows.candidates is not None else None
            reward = answer_reward(spec, its, ranks[b, :n], int(rows.targets[i]), rows.histories[i], in_c, size,
                                   cands, alpha)
            if fine_grained:
                out.append(token_rewards(texts[b], tokenizer, reward.item, reward.list_reward,
                                         response_ids=response_ids[b], titles=titles[b]))
            else:
                out.append(list_token_rewards(len(response_ids[b]), reward.list_reward))
        return out

    return reward_fn
