"""An LLM's answers as ranked lists for the one list evaluator: generation, grounding, scoring.

Shared by the LLM methods (llm-sft, SPRec, and loops that score each checkpoint): `AnswerLists` turns a model into
a `ListRecommender` (generate for the evaluated users, parse and ground each answer, top-K item ids);
`RecipeAnswers` scores a (model, tokenizer) on a run's users with the run's evaluator; `evaluate_answers` and
`evaluate_llm` do the same without a run folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, Sequence

import numpy as np
import torch

from recalign.errors import ConfigError
from recalign.llm.backends import GenerationBackend
from recalign.llm.generate import GenerationConfig
from recalign.llm.tasks import Rows, SeqRecTask

if TYPE_CHECKING:
    from recalign.eval.lists import GeneratedLists

Decoding = Literal["greedy", "constrained"]  # free text, or greedy under a catalog trie


class EvaluationContext(Protocol):
    """What `RecipeAnswers` needs of a stage's run context (`recalign.stages.RunContext` is one)."""

    dataset: Any
    split: Any
    stage_dir: Path

    def eval_users(self, part: str = "test") -> np.ndarray: ...

    def evaluate(self, model: Any, part: str = "test", **overrides: Any) -> dict: ...


def answer_lists(answers: Sequence[str], grounder, task: SeqRecTask, k: int) -> "torch.Tensor | GeneratedLists":
    """Each answer as a list: k = 1 task, the k catalog items nearest to its title (LongTensor [R, k]); a list
    task, its own titles grounded in order (`GeneratedLists`, scored with the §2.4 validity metrics)."""
    from recalign.llm.tasks import parse_title

    if task.k > 1:
        from recalign.llm.evaluate import ground_answers

        return ground_answers(answers, grounder, task.k)
    return grounder.topk([parse_title(a) for a in answers], k)


def evaluate_answers(answers: Sequence[str], rows: Rows, titles: Sequence[str], grounder, ks: Sequence[int],
                     task: SeqRecTask, popularity: torch.Tensor | None = None,
                     genre_table: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """Metrics of one answer per row (`recalign.eval.lists.score_lists`), and the top-K lists [R, max K].

    k = 1: the K catalog items nearest to the answer's title; valid_title_rate = share of answers whose title
    exactly names a catalog item. k > 1: the answer's titles, grounded in order (`recalign.llm.evaluate`), with
    the §2.4 validity metrics. An empty or unparsable answer is an empty list: a miss that counts.
    `popularity` (pop(i)) and `genre_table` (`eval.beyond.genre_weights`) switch on AvgPop and MGU/DGU.
    """
    from recalign.eval.lists import GeneratedLists, ListInputs, score_lists
    from recalign.llm.grounding import ExactGrounder
    from recalign.llm.tasks import parse_title

    targets = torch.as_tensor(rows.targets, dtype=torch.long)
    fields = dict(popularity=popularity, history=rows.histories, genre_table=genre_table)
    lists = answer_lists(answers, grounder, task, max(ks))
    if isinstance(lists, GeneratedLists):
        inputs = ListInputs.from_generated(lists, targets, len(titles), **fields)
        return score_lists(inputs, ks), inputs.lists
    metrics = score_lists(ListInputs(lists, targets, len(titles), **fields), ks)
    exact = ExactGrounder(titles).ground([parse_title(a) for a in answers])
    metrics["valid_title_rate"] = float((exact >= 0).float().mean()) if len(answers) else 0.0
    return metrics, lists


class AnswerLists:
    """A causal LM as a `recalign.eval.lists.ListRecommender`: last history titles -> generated answer -> list.

    For `recalign.eval.evaluate.evaluate(AnswerLists(...), dataset, split, ...)`: every method then is scored on
    the recipe's users and targets. `answers_` keeps the raw answers of the last call, in `users` order.
    """

    def __init__(self, model, tokenizer, task: SeqRecTask, titles: Sequence[str], grounder,
                 generation: GenerationConfig | None = None, batch_size: int = 8, decoding: Decoding = "greedy",
                 progress: bool = False, backend: GenerationBackend | None = None, scratch: Path | None = None):
        self.model, self.tokenizer, self.task, self.titles, self.grounder = model, tokenizer, task, titles, grounder
        self.generation, self.batch_size, self.progress = generation, batch_size, progress
        self.backend, self.scratch = backend or GenerationBackend(), scratch  # scratch: vllm's merged copy
        self.backend.check(constrained=decoding == "constrained")
        self.processor = catalog_constraint(titles, tokenizer, task) if decoding == "constrained" else None
        self.answers_: list[str] = []
        self.users_ = np.zeros(0, dtype=np.int64)
        self.lists_: torch.Tensor | None = None

    def answers(self, rows: Rows) -> list[str]:
        """One generated answer per row (its prompt from the row's history titles)."""
        from recalign.llm.backends import generate_answers
        from recalign.llm.tasks import prompts_for

        prompts = prompts_for(self.task, rows, self.titles, self.tokenizer)
        outputs = generate_answers(self.backend, self.model, self.tokenizer, prompts, self.settings(),
                                   batch_size=self.batch_size, logits_processor=self.processor,
                                   progress=self.progress, scratch=self.scratch)
        return [o[0] for o in outputs]

    def settings(self) -> GenerationConfig:
        """The decoding settings; a list task may stop once k + 1 titles are final (`stop_after_titles`): its
        first k grounded titles and CorrectCount (exactly k titles) are those of the whole answer."""
        settings = self.generation or GenerationConfig()
        if self.task.k > 1 and settings.stop_after_titles is None:
            settings = settings.model_copy(update={"stop_after_titles": self.task.k + 1})
        return settings

    def recommend(self, users, histories, k: int):
        """Top-k lists of `users` given their `histories` (UserSequences), -1 padded; or `GeneratedLists`."""
        users = np.asarray(users, dtype=np.int64)
        recent = [histories[u][-self.task.max_history:].tolist() for u in users]  # one prompt per user
        rows = Rows(users, recent, np.full(len(users), -1, dtype=np.int64), next_items=[[] for _ in users])
        self.answers_ = self.answers(rows)
        self.users_ = users
        lists = answer_lists(self.answers_, self.grounder, self.task, k)
        self.lists_ = lists.lists() if hasattr(lists, "lists") else lists
        return lists

    def records(self, targets: "dict[int, int] | None" = None) -> list[dict]:
        """Per evaluated user of the last call: user, raw answer, top-K item ids (and target when given)."""
        lists = self.lists_.tolist() if self.lists_ is not None else [[] for _ in self.users_]
        return [{"user": int(u), **({"target": int(targets[int(u)])} if targets else {}), "answer": a, "top_k": row}
                for u, a, row in zip(self.users_.tolist(), self.answers_, lists)]


def catalog_constraint(titles: Sequence[str], tokenizer, task: SeqRecTask):
    """The trie of every catalog title wrapped in the answer's quotes, as a per-batch logits processor."""
    from recalign.llm.constrained import CatalogTrie
    from recalign.llm.generate import TrieConstraint

    if task.k != 1:
        raise ConfigError("constrained decoding needs a one-title task (task.k = 1)")
    prefix, suffix = task.template().title_affixes()
    return TrieConstraint(CatalogTrie.from_titles(list(titles), tokenizer, prefix=prefix, suffix=suffix))


def evaluate_llm(model, tokenizer, task: SeqRecTask, rows: Rows, titles: Sequence[str], grounder,
                 ks: Sequence[int], decodings: Sequence[str] = ("greedy",),
                 generation: GenerationConfig | None = None, batch_size: int = 8, progress: bool = False,
                 popularity: torch.Tensor | None = None, genre_table: torch.Tensor | None = None,
                 ) -> tuple[dict, dict[str, list[str]]]:
    """Generate for `rows` with every decoding and score the answers; returns (metrics, answers per decoding)."""
    metrics: dict = {}
    answers: dict[str, list[str]] = {}
    for position, decoding in enumerate(decodings):
        model_lists = AnswerLists(model, tokenizer, task, titles, grounder, generation, batch_size, decoding, progress)
        started = time.perf_counter()
        answers[decoding] = model_lists.answers(rows)
        seconds = time.perf_counter() - started
        scored, _ = evaluate_answers(answers[decoding], rows, titles, grounder, ks, task, popularity, genre_table)
        scored["generation_seconds"] = round(seconds, 3)
        prefix = "" if position == 0 else f"{decoding}."
        metrics.update({f"{prefix}{key}": value for key, value in scored.items()})
    return metrics, answers


class RecipeAnswers:
    """An LLM loop's evaluator on the recipe's users: (model, tokenizer) -> `ctx.evaluate(AnswerLists(...))` metrics.

    Used by SPRec (and the next train -> generate -> score loops) under the default protocol: every checkpoint is
    scored on the same users, targets and metrics as the recipe's other stages. After a call `answers_` holds the
    per-user record (user, target, raw answer, top-K ids); `rows.users` are the users and `score(lists, index)`
    re-scores top-K lists on rows `index` (repeats allowed) for paired comparisons.
    """

    def __init__(self, ctx: EvaluationContext, task: SeqRecTask, grounder, generation: GenerationConfig | None = None,
                 batch_size: int = 8, part: str = "test", progress: bool = False,
                 backend: GenerationBackend | None = None):
        from recalign.eval.evaluate import relevant_items

        self.ctx, self.task, self.grounder, self.part = ctx, task, grounder, part
        self.generation, self.batch_size, self.progress = generation, batch_size, progress
        self.backend = backend or GenerationBackend()
        users = ctx.eval_users(part)
        targets = first_targets(ctx, part)
        self.history = ctx.dataset.sequences(ctx.split.history(part))
        self.rows = Rows(users, [self.history[u][-task.max_history:].tolist() for u in users],
                         np.asarray([targets[int(u)] for u in users], dtype=np.int64))
        self.targets = targets
        eligible, relevant, counts = relevant_items(ctx.split.part(part), ctx.dataset.n_users)
        index = torch.from_numpy(np.searchsorted(eligible, users))
        self.relevant, self.counts = relevant[index], counts[index]
        from recalign.eval.beyond import catalog_genre_table, popularity

        self.popularity = popularity(ctx.split.history("valid")["item_id"].to_numpy(), ctx.dataset.n_items)
        self.genre_table = catalog_genre_table(ctx.dataset.item_categories())  # as `evaluate` builds them
        self.answers_: list[dict] = []

    def __call__(self, model, tokenizer) -> dict:
        """Generate for the recipe's users, ground, and score with the recipe's evaluator."""
        titles = self.ctx.dataset.titles()
        lists_model = AnswerLists(model, tokenizer, self.task, titles, self.grounder, self.generation,
                                  self.batch_size, progress=self.progress, backend=self.backend,
                                  scratch=self.ctx.stage_dir / "scratch")
        metrics = self.ctx.evaluate(lists_model, part=self.part, users=self.rows.users)
        metrics.update(title_validity(lists_model.answers_, titles, self.task))
        self.answers_ = lists_model.records(self.targets)
        return metrics

    def score(self, lists: torch.Tensor, index: np.ndarray | None = None) -> dict:
        """The list metrics of top-K lists [rows, K] on the evaluated users (or rows `index`, repeats allowed)."""
        from recalign.eval.lists import ListInputs, score_lists, users_sequences

        index = np.arange(len(self.rows)) if index is None else np.asarray(index, dtype=np.int64)
        chosen = torch.from_numpy(index)
        inputs = ListInputs(lists[chosen], self.relevant[chosen], self.ctx.dataset.n_items,
                            n_relevant=self.counts[chosen], popularity=self.popularity,
                            history=users_sequences(self.history, self.rows.users[index]), genre_table=self.genre_table)
        return score_lists(inputs, self.ctx.recipe.eval.ks)


def title_validity(answers: Sequence[str], titles: Sequence[str], task: SeqRecTask) -> dict:
    """valid_title_rate: the share of one-title answers that name a catalog title exactly ({} for list tasks)."""
    from recalign.llm.grounding import ExactGrounder
    from recalign.llm.tasks import parse_title

    if task.k > 1 or not len(answers):
        return {}
    exact = ExactGrounder(titles).ground([parse_title(a) for a in answers])
    return {"valid_title_rate": float((exact >= 0).float().mean())}


def first_targets(ctx: EvaluationContext, part: str) -> dict[int, int]:
    """Each user's first item of `part` (the target of a leave-one-out split)."""
    frame = ctx.split.part(part).sort_values(["user_id", "timestamp"], kind="stable").drop_duplicates("user_id")
    return dict(zip(frame["user_id"].astype(int).tolist(), frame["item_id"].astype(int).tolist()))
