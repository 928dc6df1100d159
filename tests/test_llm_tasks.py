"""LLM tasks: prompt registry, rows from a split, prompt/completion examples, and the answer parser."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recalign.data.dataset import build_dataset
from recalign.data.split import leave_one_out_split
from recalign.errors import ConfigError
from recalign.llm.prompts import TEMPLATES, get_template, numbered, quoted, render_prompt
from recalign.llm.tasks import (
    RankingTask, SeqRecTask, add_candidates, eval_rows, parse_title, parse_titles, rows_from_sequences,
    sample_rows, sft_examples, train_rows,
)

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


class PlainTokenizer:
    """No chat template: render_prompt falls back to 'role: content' lines."""

    chat_template = None


def _dataset():
    """3 users over 6 titled items; user u0 reads 0..4, u1 reads 1,2,3, u2 reads 5,0,1,2."""
    seqs = {"u0": [0, 1, 2, 3, 4], "u1": [1, 2, 3], "u2": [5, 0, 1, 2]}
    frame = pd.DataFrame([(u, f"i{i}", t) for u, s in seqs.items() for t, i in enumerate(s)],
                         columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"item": [f"i{i}" for i in range(6)], "title": [f"Book {c}" for c in "ABCDEF"]})
    return build_dataset(frame, items=items, name="t", source="test")


# ---- prompts -------------------------------------------------------------------------------------------------

def test_templates_fill_every_field_and_reject_missing_ones():
    seqrec = get_template("seqrec")
    messages = seqrec.messages(history=quoted(["A", "B"]))
    assert messages == [{"role": "user", "content": seqrec.user.format(history='"A", "B"')}]
    assert seqrec.completion(title="Dune") == '"Dune"'
    assert seqrec.title_affixes() == ('"', '"')
    with pytest.raises(ConfigError, match="missing field"):
        get_template("ranking").messages(history="x")
    with pytest.raises(ConfigError, match="choose one of"):
        get_template("nope")
    assert set(TEMPLATES) >= {"seqrec", "seqrec_list", "ranking"}
    assert numbered(["A", "B"]) == '1. "A"\n2. "B"'


def test_render_prompt_without_chat_template_opens_the_assistant_turn():
    text = render_prompt(PlainTokenizer(), [{"role": "user", "content": "hi"}])
    assert text == "user: hi\nassistant: "


# ---- rows ------------------------------------------------------------------------------------------------------

def test_rows_from_sequences_cut_last_positions_with_bounded_history():
    rows = rows_from_sequences([[1, 2, 3, 4, 5], [7]], max_history=2, rows_per_sequence=2, n_next=2)
    # positions 3 and 4 of the first sequence; the 1-item sequence has no position with a history
    assert rows.histories == [[2, 3], [3, 4]]
    assert rows.targets.tolist() == [4, 5]
    assert rows.next_items == [[4, 5], [5]]
    assert rows.users.tolist() == [0, 0]


def test_train_and_eval_rows_follow_the_leave_one_out_split():
    dataset = _dataset()
    split = leave_one_out_split(dataset)
    train = train_rows(dataset, split, max_history=10)
    # train sequences: u0 [0,1,2], u1 [1], u2 [5,0] (u1 has one train item: no row)
    assert sorted(zip(train.users.tolist(), train.targets.tolist())) == [(0, 2), (2, 0)]
    test = eval_rows(dataset, split, "test", max_history=2)
    by_user = {int(u): (h, int(t)) for u, h, t in zip(test.users, test.histories, test.targets)}
    assert by_user[0] == ([2, 3], 4)   # history = train + valid, last 2 items
    assert by_user[1] == ([1, 2], 3)
    assert by_user[2] == ([0, 1], 2)


def test_sample_rows_is_seeded_and_without_replacement():
    rows = rows_from_sequences([[i, i + 1] for i in range(20)])
    a, b = sample_rows(rows, 7, seed=3), sample_rows(rows, 7, seed=3)
    assert a.users.tolist() == b.users.tolist()
    assert len(set(a.users.tolist())) == 7
    assert sample_rows(rows, 7, seed=4).users.tolist() != a.users.tolist()
    assert sorted(sample_rows(rows, None, seed=0).users.tolist()) == list(range(20))


def test_candidates_hold_the_target_once_and_no_history_item():
    rows = rows_from_sequences([[0, 1, 2], [3, 4, 5], [6, 7, 8]], max_history=5)
    ranked = add_candidates(rows, n_items=30, n_negatives=9, seed=0)
    for history, target, candidates in zip(ranked.histories, ranked.targets, ranked.candidates):
        assert len(candidates) == 10 and len(set(candidates)) == 10
        assert candidates.count(int(target)) == 1
        assert not set(history) & set(candidates)
    again = add_candidates(rows, n_items=30, n_negatives=9, seed=0)
    assert again.candidates == ranked.candidates


# ---- examples ----------------------------------------------------------------------------------------------------

def test_seqrec_examples_name_history_and_target_titles():
    dataset = _dataset()
    titles = dataset.titles()
    rows = rows_from_sequences([[0, 1, 2]], max_history=10)
    (example,) = sft_examples(SeqRecTask(), rows, titles, PlainTokenizer())
    assert '"Book A", "Book B"' in example["prompt"] and "Book C" not in example["prompt"]
    assert example["prompt"].endswith("assistant: ")
    assert example["completion"] == '"Book C"'
    listed = sft_examples(SeqRecTask(k=2), rows_from_sequences([[0, 1, 2, 3]], rows_per_sequence=1, n_next=2,
                                                               min_history=2), titles, PlainTokenizer())
    assert listed[0]["completion"] == '1. "Book D"'  # only one item follows the history
    listed = sft_examples(SeqRecTask(k=2), rows_from_sequences([[0, 1, 2, 3]], rows_per_sequence=2, n_next=2),
                          titles, PlainTokenizer())
    assert listed[0]["completion"] == '1. "Book C"\n2. "Book D"'


def test_ranking_examples_list_candidates_and_answer_the_target():
    rows = add_candidates(rows_from_sequences([[0, 1, 2]]), n_items=6, n_negatives=3, seed=1)
    titles = [f"T{i}" for i in range(6)]
    (example,) = sft_examples(RankingTask(n_candidates=4), rows, titles, PlainTokenizer())
    for item in rows.candidates[0]:
        assert f'"T{item}"' in example["prompt"]
    assert example["completion"] == '"T2"'
    with pytest.raises(ConfigError, match="candidate"):
        sft_examples(RankingTask(), rows_from_sequences([[0, 1]]), titles, PlainTokenizer())


def test_build_sft_dataset_is_seeded():
    from recalign.llm.tasks import build_sft_dataset

    dataset = _dataset()
    split = leave_one_out_split(dataset)
    a = build_sft_dataset(SeqRecTask(), dataset, split, PlainTokenizer(), part="test", max_rows=2, seed=5)
    b = build_sft_dataset(SeqRecTask(), dataset, split, PlainTokenizer(), part="test", max_rows=2, seed=5)
    assert a.column_names == ["prompt", "completion"] and len(a) == 2
    assert a.to_list() == b.to_list()


# ---- parser --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('"Dune"', ["Dune"]),
    ('Sure! I recommend "Dune" by Frank Herbert.', ["Dune"]),
    ('1. "Dune"\n2. "Emma"\n3. "Ulysses"', ["Dune", "Emma", "Ulysses"]),
    ('Here are my picks:\n1. "Dune"\n2) “Emma”\nHope you like them!', ["Dune", "Emma"]),
    ("1. Dune\n2. Emma\nEnjoy!", ["Dune", "Emma"]),
    ("1. Dune 2. Emma 3. Ulysses", ["Dune", "Emma", "Ulysses"]),
    ("- Dune\n* Emma", ["Dune", "Emma"]),
    ("Dune\nEmma", ["Dune", "Emma"]),
    ('1. "Dune"\n2. "Em', ["Dune", "Em"]),        # the last title was cut by max_new_tokens
    ('"Dune", "Dune"', ["Dune", "Dune"]),          # repeats are kept (the Repeat metric needs them)
    ('"Les Misérables" «Война и мир» "東京物語"', ["Les Misérables", "Война и мир", "東京物語"]),
    ("", []),
    ("   \n\n  ", []),
    ('""', []),
    (None, []),
])
def test_parse_titles(text, expected):
    assert parse_titles(text) == expected


def test_parse_titles_caps_count_and_length():
    long = "x" * 5000
    assert parse_titles(f'"{long}"') == ["x" * 300]
    many = "\n".join(f'{i}. "T{i}"' for i in range(1, 500))
    assert len(parse_titles(many)) == 100
    assert parse_titles(many, k=3) == ["T1", "T2", "T3"]
    assert parse_title('1. "A"\n2. "B"') == "A" and parse_title("") == ""


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=400))
def test_parse_titles_never_fails_and_returns_clean_titles(text):
    titles = parse_titles(text)
    assert len(titles) <= 100
    for title in titles:
        assert title and title == title.strip() and len(title) <= 300 and "\n" not in title


def test_get_task_by_kind():
    from recalign.llm.tasks import get_task

    assert isinstance(get_task("seqrec", k=3), SeqRecTask)
    assert isinstance(get_task("ranking"), RankingTask)
    with pytest.raises(ConfigError, match="unknown LLM task"):
        get_task("cot")


def test_rows_take_keeps_extras_aligned():
    rows = add_candidates(rows_from_sequences([[0, 1], [2, 3], [4, 5]]), n_items=10, n_negatives=2, seed=0)
    picked = rows.take(np.array([2, 0]))
    assert picked.targets.tolist() == [5, 1]
    assert picked.candidates == [rows.candidates[2], rows.candidates[0]]
    assert picked.next_items == [[5], [1]]


# ---- the open registry ---------------------------------------------------------------------------------------

class ControlTask:
    """A task defined outside recalign: history + a requested category (+C / -C) -> a title within it."""

    kind = "test_control"

    def __init__(self, max_history: int = 2):
        self.max_history = max_history

    def row_messages(self, rows, index, titles):
        history = ", ".join(titles[i] for i in rows.histories[index][-self.max_history:])
        return [{"role": "user", "content": f"After {history}, recommend one {rows.categories[index]} book."}]

    def row_completion(self, rows, index, titles):
        return f'"{titles[int(rows.targets[index])]}" ({rows.labels[index]})'

    def train_rows(self, dataset, split):
        return train_rows(dataset, split, self.max_history)

    def eval_rows(self, dataset, split, part="test", seed=0):
        return eval_rows(dataset, split, part, self.max_history)


def test_a_task_registered_from_outside_is_found_and_builds_examples():
    import dataclasses

    from recalign.llm import tasks

    tasks.register_task("test_control", ControlTask)
    try:
        task = tasks.get_task("test_control", max_history=1)
        assert isinstance(task, tasks.Task) and "test_control" in tasks.task_kinds()
        rows = rows_from_sequences([[0, 1, 2], [3, 4]], max_history=5)
        rows = dataclasses.replace(rows, categories=["+Fantasy", "-Horror"], labels=["yes", "no"])
        picked = rows.take([1, 0])  # the per-row control fields follow the rows
        assert picked.categories == ["-Horror", "+Fantasy"] and picked.labels == ["no", "yes"]
        examples = sft_examples(task, picked, [f"T{i}" for i in range(5)], PlainTokenizer())
        assert examples[0]["prompt"] == "user: After T3, recommend one -Horror book.\nassistant: "
        assert examples[0]["completion"] == '"T4" (no)'
        assert examples[1]["prompt"] == "user: After T1, recommend one +Fantasy book.\nassistant: "
        assert examples[1]["completion"] == '"T2" (yes)'
        with pytest.raises(ConfigError, match="already registered"):
            tasks.register_task("test_control", lambda **options: ControlTask(**options))
        with pytest.raises(ConfigError, match="does not implement"):
            tasks.register_task("test_broken", lambda: object())
            tasks.get_task("test_broken")
    finally:
        tasks.TASKS.pop("test_control", None)
        tasks.TASKS.pop("test_broken", None)
    with pytest.raises(ConfigError, match="unknown LLM task"):
        tasks.get_task("test_control")


def test_task_options_are_checked():
    from recalign.llm.tasks import get_task

    with pytest.raises(ConfigError, match="k"):
        get_task("seqrec", k=0)
    with pytest.raises(ConfigError, match="n_candidates"):
        get_task("ranking", n_candidates=1)
