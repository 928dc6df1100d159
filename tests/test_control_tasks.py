"""RecLM-gen's control tasks (systems.md §5.3, §5.4, §5.6): teacher labels, seeded per-epoch rows, prompts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recalign.data.split import leave_one_out_split
from recalign.errors import ConfigError
from recalign.methods.reclmgen.metrics import CategoryTable
from recalign.methods.reclmgen.tasks import (ControlSource, ControlRequest, build_test_rows, minus_categories, rl_rows,
                                        sft_category_rate, sft_control, sft_control_re, sft_rows, sft_seqrec,
                                        epoch_generator, metric_inputs, parse_test_task, rl_validation_rows)
from recalign.llm.tasks import Rows, get_task, parse_titles, sft_examples

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

N_ITEMS = 30
# Item i is in "c{i % 3}"; item 0 is also in c1.  c0 = {0, 3, ..., 27}, c1 = {0, 1, 4, ..., 28}, c2 = {2, 5, ..., 29}.
ITEM_CATEGORIES = [[f"c{i % 3}"] + (["c1"] if i == 0 else []) for i in range(N_ITEMS)]
CATS = CategoryTable.from_item_categories(ITEM_CATEGORIES)
C0, C1, C2 = (CATS.index(c) for c in ("c0", "c1", "c2"))
TITLES = [f"Item {i}" for i in range(N_ITEMS)]


class FakeTeacher:
    """Brute force over one fixed score per item (item 0 best): the teacher service's two operations."""

    def __init__(self, categories: CategoryTable):
        self.categories = categories
        self.scores = torch.arange(N_ITEMS, 0, -1, dtype=torch.float64)
        self.calls = 0

    def topk(self, histories, k, *, users=None, candidates=None, categories=None, exclude_history=True):
        # the service validates plain lists of ints (its HTTP client sends them as JSON)
        assert isinstance(histories, list) and all(type(i) is int for h in histories for i in h)
        assert users is None or (isinstance(users, list) and all(type(u) is int for u in users))
        self.calls += 1
        out = torch.full((len(histories), k), -1, dtype=torch.long)
        for row, history in enumerate(histories):
            allowed = torch.ones(N_ITEMS, dtype=torch.bool)
            if candidates is not None:
                allowed = torch.isin(torch.arange(N_ITEMS), torch.as_tensor(candidates[row]))
            if categories is not None and categories[row] is not None:
                column = self.categories.table[:, self.categories.index(categories[row][1:])]
                allowed &= column if categories[row][0] == "+" else ~column
            if exclude_history:
                allowed[torch.as_tensor(list(history), dtype=torch.long)] = False
            ranked = [i for i in torch.argsort(-self.scores, stable=True).tolist() if allowed[i]][:k]
            out[row, : len(ranked)] = torch.tensor(ranked, dtype=torch.long)
        return out

    def ranks(self, histories, candidates, users=None):
        return (self.scores[None, None, :] > self.scores[torch.tensor(candidates)][..., None]).sum(-1)


def source(n_same=40, n_random=20):
    """n_same users with the sequence [5, 3] (history [5], target 3) and n_random seeded longer sequences."""
    rng = np.random.default_rng(0)
    seqs = [[5, 3]] * n_same + [rng.permutation(N_ITEMS)[:8].tolist() for _ in range(n_random)]
    return ControlSource(np.arange(len(seqs)), seqs, CATS, FakeTeacher(CATS))


def snapshot(rows: Rows):
    return (rows.users.tolist(), rows.histories, rows.targets.tolist(), rows.next_items, rows.candidates,
            rows.categories, rows.labels)


def same_user_rows(rows: Rows):
    return [i for i in range(len(rows)) if rows.histories[i] == [5] and rows.targets[i] == 3]


def test_sft_rows_are_the_same_for_the_same_seed_and_epoch_and_change_per_epoch():
    src = source()
    first = sft_rows(src, epoch=0, seed=3)
    assert snapshot(first) == snapshot(sft_rows(src, epoch=0, seed=3))
    assert snapshot(first) != snapshot(sft_rows(src, epoch=1, seed=3))
    assert snapshot(first) != snapshot(sft_rows(src, epoch=0, seed=4))
    assert {s.task for s in first.labels} == {"seqrec", "+c", "-c", "lp", "mp", "ep", "control_re", "category_re"}


def test_sft_seqrec_label_is_target_then_teacher_top_k():
    rows = sft_seqrec(source(), epoch_generator(0, 0))
    ks = [spec.k for spec in rows.labels]
    assert set(ks) <= set(range(1, 11)) and len(set(ks)) > 3
    for i in same_user_rows(rows):
        # teacher order without the history item 5: 0 1 2 3 4 6 7 ...; the target 3 first, then the rest.
        assert rows.next_items[i] == [3, 0, 1, 2, 4, 6, 7, 8, 9, 10][: ks[i]]
        if rows.labels[i].select:
            assert len(rows.candidates[i]) == 10 and set(rows.next_items[i]) <= set(rows.candidates[i])
            assert 5 not in rows.candidates[i]
        else:
            assert rows.candidates[i] is None
    assert 0.3 < np.mean([s.select for s in rows.labels]) < 0.7


def test_sft_control_plus_and_minus_labels():
    rows = sft_control(source(), epoch_generator(0, 1))
    signs = [spec.task for spec in rows.labels]
    assert {"+c", "-c"} == set(signs)
    for i in same_user_rows(rows):
        spec = rows.labels[i]
        if spec.task == "-c":
            # teacher top-10 [0 1 2 3 4 6 7 8 9 10]: c0 x4 (the target's), c1 x5, c2 x2 -> C = c1
            assert spec.category == "c1" and rows.categories[i] == "-c1"
            assert rows.next_items[i] == [2, 3, 6, 8, 9, 11, 12, 14, 15, 17][: spec.k]
        else:
            column = CATS.table[:, CATS.index(spec.category)]
            ranked = [j for j in range(N_ITEMS) if column[j] and j not in (3, 5)]
            front = [3] if column[3] else []
            assert rows.next_items[i] == (front + ranked)[: spec.k]
            assert 1 <= spec.k <= min(10, int(column.sum()))


def test_sft_category_rate_rules():
    rows = sft_category_rate(source(), epoch_generator(0, 2))
    assert {s.task for s in rows.labels} == {"lp", "mp", "ep"}
    for i, spec in enumerate(rows.labels):
        label = rows.next_items[i]
        n_in = int(CATS.table[torch.tensor(label), CATS.index(spec.category)].sum())
        assert spec.k == 10 and len(set(label)) == 10 and not set(label) & set(rows.histories[i])
        assert spec.p == 10 * spec.m
        assert n_in in {"lp": (spec.m, spec.m - 1), "mp": (spec.m, spec.m + 1), "ep": (spec.m,)}[spec.task]
    assert {s.count_wording for s in rows.labels} == {True, False}


def test_sft_control_re_one_row_per_item_with_reverse_questions():
    rows = sft_control_re(source(), epoch_generator(0, 3))
    assert sorted(rows.targets.tolist()) == list(range(N_ITEMS))
    assert all(h == [] for h in rows.histories)
    for item, spec, signed in zip(rows.targets, rows.labels, rows.categories):
        if spec.task == "category_re":
            assert signed is None and spec.answer_categories == tuple(ITEM_CATEGORIES[item])
            continue
        own = spec.category in ITEM_CATEGORIES[item]
        assert spec.k == 1 and own == (spec.sign == "+") and signed == spec.sign + spec.category
    assert 0 < sum(s.task == "category_re" for s in rows.labels) < N_ITEMS


def test_minus_categories_hand_made():
    lists = torch.tensor([[0, 6, 9, -1], [-1, -1, -1, -1], [2, 3, 8, 11]])
    got = minus_categories(CATS, lists, torch.tensor([3, 0, 4]))
    # row 0: c0 excluded (target 3), c1 once (item 0); row 1: nothing; row 2: c2 x3 beats c0 x1.
    assert got.tolist() == [C1, -1, C2]


def test_rl_rows_one_per_task_and_user_with_k_6_to_10():
    src = source(n_same=10, n_random=5)
    rows = rl_rows(src, episode=0, seed=1)
    assert len(rows) == 15 * 6
    assert snapshot(rows) == snapshot(rl_rows(src, episode=0, seed=1))
    assert snapshot(rows) != snapshot(rl_rows(src, episode=1, seed=1))
    for i, spec in enumerate(rows.labels):
        assert 6 <= spec.k <= 10
        if spec.task in ("lp", "mp", "ep"):
            assert spec.m == spec.p * spec.k // 100
        if rows.histories[i] == [5] and rows.targets[i] == 3:
            expected = {"seqrec": None, "-c": "c1", "lp": "c1", "+c": "c0", "mp": "c0", "ep": "c0"}[spec.task]
            assert spec.category == expected


def test_test_rows_every_task():
    base = Rows(np.array([0, 1, 2]), [[5], [1, 2], [7]], np.array([3, 0, 4]))
    teacher = FakeTeacher(CATS)
    seqrec = build_test_rows(base, "seqrec", CATS)
    assert [s.k for s in seqrec.labels] == [10, 10, 10] and seqrec.categories == [None] * 3
    plus = build_test_rows(base, "+c", CATS)
    # the last of the target's categories in sorted order: 3 -> c0, 0 -> c1 (it is in c0 and c1), 4 -> c1
    assert [s.category for s in plus.labels] == ["c0", "c1", "c1"] and plus.categories[0] == "+c0"
    answers = torch.tensor([[0, 6, 9, -1], [-1, -1, -1, -1], [2, 3, 8, 11]])
    minus = build_test_rows(base, "-c", CATS, seqrec_lists=answers, teacher=teacher)
    # row 1 answered nothing: the teacher's top-10 after history [1, 2] is 0 3 4 5 ... 11 -> c2 (0 carries c0, c1)
    assert [s.category for s in minus.labels] == ["c1", "c2", "c2"] and minus.categories[0] == "-c1"
    no_teacher = build_test_rows(base, "-c", CATS, seqrec_lists=answers)
    assert no_teacher.labels[1].category == "c2"   # the catalog's most frequent category without c0 and c1
    lp = build_test_rows(base, "lp_20", CATS, seqrec_lists=answers, teacher=teacher)
    assert [(s.task, s.category, s.p, s.m) for s in lp.labels][0] == ("lp", "c1", 20, 2)
    ep = build_test_rows(base, "ep_30", CATS)
    mp = build_test_rows(base, "mp_30", CATS)
    assert (ep.labels[0].task, ep.labels[0].m, mp.labels[0].task, mp.labels[0].category) == ("ep", 3, "mp", "c0")
    count = build_test_rows(base, "itemcount", CATS, seed=2)
    assert all(11 <= s.k <= 15 for s in count.labels)
    ranking = build_test_rows(base, "ranking", CATS, n_negatives=20)
    for i in range(3):
        cands = ranking.candidates[i]
        assert len(set(cands)) == 21 and int(base.targets[i]) in cands and not set(cands) & set(base.histories[i])
    with pytest.raises(ConfigError, match="SeqRec answers"):
        build_test_rows(base, "-c", CATS)
    with pytest.raises(ConfigError, match="expected one of"):
        build_test_rows(base, "lp_500", CATS)
    assert parse_test_task("ep_50") == ("ep", 50) and parse_test_task("+c") == ("+c", None)


def test_prompts_and_answers_round_trip():
    task = get_task("reclm_sft")
    specs = [ControlRequest("seqrec", 2), ControlRequest("seqrec", 2, select=True), ControlRequest("+c", 2, "c0"),
             ControlRequest("-c", 2, "c1", variant=1), ControlRequest("lp", 10, "c2", p=20, m=2),
             ControlRequest("mp", 10, "c2", p=30, m=3, count_wording=True), ControlRequest("ep", 10, "c0", p=40, m=4),
             ControlRequest("control_re", 1, "c1", sign="-"), ControlRequest("category_re", 1, answer_categories=("c0",))]
    rows = Rows(np.zeros(9, dtype=np.int64), [[5, 7]] * 9, np.full(9, 3), [[3, 0]] * 9,
                [[0, 3, 9]] * 9, [None] * 9, specs)
    users = [task.row_messages(rows, i, TITLES)[-1]["content"] for i in range(9)]
    assert '"Item 5" → "Item 7"' in users[0] and "2 different items" in users[0]
    assert "1. \"Item 0\"\n2. \"Item 3\"\n3. \"Item 9\"" in users[1]
    assert 'I like "c0" items.' in users[2] and 'I do not want "c1" items.' in users[3]
    assert 'at most 20% of the items should be "c2"' in users[4]
    assert 'at least 3 of the 10 items should be "c2"' in users[5]
    assert 'exactly 40% of the items should be "c0"' in users[6]
    assert 'Please exclude any "c1" item.' in users[7] and "Item 5" not in users[7]
    assert users[8] == 'What is the category of "Item 3"?'
    for i in range(8):
        assert parse_titles(task.row_completion(rows, i, TITLES)) == ["Item 3", "Item 0"]
    assert task.row_completion(rows, 8, TITLES) == 'The category of "Item 3" is "c0".'


def test_registered_tasks_from_a_dataset(tiny_dataset):
    split = leave_one_out_split(tiny_dataset)
    with pytest.raises(ConfigError, match="need a teacher"):
        get_task("reclm_sft").train_rows(tiny_dataset, split)
    test = get_task("reclm_test", task="+c").eval_rows(tiny_dataset, split)
    # test targets: alice i4 (Romance, Mystery -> "Romance" last in sorted order), bob i5, carol i5 (Romance)
    assert [s.category for s in test.labels] == ["Romance", "Romance", "Romance"]
    with pytest.raises(ConfigError, match="controllable test task 'zzz'"):
        get_task("reclm_test", task="zzz")


def test_with_the_real_teacher_service(tiny_dataset):
    """The calls the tasks make are the ones the in-process teacher service answers (no fake)."""
    from recalign.teachers.popularity import Popularity
    from recalign.teachers.service import TeacherService

    split = leave_one_out_split(tiny_dataset)
    service = TeacherService(Popularity().fit(tiny_dataset, split.part("train"), progress=False))
    task = get_task("reclm_sft", seed=5)
    rows = task.train_rows(tiny_dataset, split, teacher=service, epoch=0)
    assert snapshot(rows) == snapshot(task.train_rows(tiny_dataset, split, teacher=service, epoch=0))
    for i, spec in enumerate(rows.labels):
        assert not set(rows.next_items[i]) & set(rows.histories[i])
        if spec.task == "seqrec":
            assert rows.next_items[i][0] == rows.targets[i] and len(rows.next_items[i]) == spec.k
    examples = sft_examples(task, rows, tiny_dataset.titles(), SimpleNamespace(chat_template=None))
    assert len(examples) == len(rows) and all(e["prompt"].startswith("user: ") for e in examples)
    rl = get_task("reclm_rl").train_rows(tiny_dataset, split, teacher=service, epoch=0)
    assert {s.task for s in rl.labels} >= {"seqrec", "+c"}
    test = get_task("reclm_test", task="-c").eval_rows(
        tiny_dataset, split, seqrec_lists=torch.full((3, 10), -1), teacher=service)
    # alice's target i4 is Romance + Mystery (nothing left to exclude: she sits -C out); bob's and carol's i5 is
    # Romance -> Mystery
    assert test.targets.tolist() == [4, 4] and [s.category for s in test.labels] == ["Mystery", "Mystery"]


def test_rl_validation_mix():
    base = Rows(np.array([0, 1, 2]), [[5], [1, 2], [7]], np.array([3, 0, 4]))
    rows = rl_validation_rows(base, CATS, FakeTeacher(CATS))
    got = [(s.task, s.p) for s in rows.labels[::3]]
    assert got == [("seqrec", None), ("+c", None), ("-c", None), ("lp", 20), ("mp", 30), ("ep", 50),
                   ("itemcount", None)]
    assert rows.labels[6].category == "c1"  # -C of row 0 from the teacher's top-10 (as in the SFT -C case)


def test_metric_inputs_from_test_rows():
    from recalign.methods.reclmgen.metrics import score_control

    base = Rows(np.array([0, 1, 2]), [[5], [1, 2], [7]], np.array([3, 0, 4]))
    rows = build_test_rows(base, "ep_30", CATS)   # C = c0, c1, c1; k = 10, m = 3
    grounded = torch.full((3, 10), -2)
    grounded[0, :4] = torch.tensor([0, 3, 6, -1])          # three in c0
    grounded[2, :5] = torch.tensor([1, 4, 7, 10, 13])      # five in c1; 7 is in the history
    out = score_control(metric_inputs(rows, grounded, CATS, n_outputs=torch.tensor([4, 0, 10])))
    assert out["category_rate_correct"] == pytest.approx(1 / 3)  # |3-3| <= 1; empty |0-3|; |5-3| = 2
    assert out["target_category_rate"] == pytest.approx((3 / 10 + 0 + 5 / 10) / 3)
    assert out["recall"] == pytest.approx(2 / 3) and out["mrr"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    assert out["in_history"] == pytest.approx(1 / 30) and out["correct_count"] == pytest.approx(1 / 3)
    assert "not_in_candidate" not in out


def test_source_needs_two_items_per_sequence():
    with pytest.raises(ConfigError, match="at least 2 items"):
        ControlSource(np.arange(2), [[1, 2], [3]], CATS, FakeTeacher(CATS))
