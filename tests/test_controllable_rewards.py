"""RecLM-gen rewards (systems.md §5.5) on hand-made answers, and their placement on tokens."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from recalign.errors import ConfigError
from recalign.methods.reclmgen.metrics import CategoryTable
from recalign.methods.reclmgen.tasks import ControlRequest
from recalign.llm.tasks import Rows
from recalign.methods.reclmgen.rewards import (answer_reward, list_token_rewards, make_reward_fn, normaliser,
                                                    token_rewards)

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

# Items 0..7; category A = {0, 1, 2, 7} (item 2 is also B), B = {2, 3, 4}, C = {5, 6}.
ITEM_CATEGORIES = [["A"], ["A"], ["A", "B"], ["B"], ["B"], ["C"], ["C"], ["A"]]
CATS = CategoryTable.from_item_categories(ITEM_CATEGORIES)
TITLES = ["Alpha", "Bravo", "Charlie Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India"]
A = CATS.index("A")
L2 = math.log2


def in_a(items):
    return CATS.contains(torch.tensor([items]), torch.tensor([A]))[0]


def reward(task, items, k, m=None, ranks=None, target=99, history=(), candidates=None):
    items = torch.tensor(items)
    ranks = torch.zeros(len(items), dtype=torch.long) if ranks is None else torch.tensor(ranks)
    spec = ControlRequest(task, k, "A", m=m)
    return answer_reward(spec, items, ranks, target, list(history), in_a(items.tolist()), 4, candidates)


def test_normaliser_is_the_ideal_discounted_sum():
    assert normaliser(1) == 1.0
    assert normaliser(3) == pytest.approx(1 + 1 / L2(3) ** 2 + 1 / 4)


def test_seqrec_item_scores_invalid_items_and_list_reward():
    # k = 5, target 1, history [5]; answer: 1 (target), 3 (rank 1), unknown, 3 again, 5 (history), 0 (idx >= k).
    r = reward("seqrec", [1, 3, -1, 3, 5, 0], k=5, ranks=[0, 1, 0, 1, 2, 0], target=1, history=[5])
    assert r.rank.tolist() == pytest.approx([1.0, 0.5, -1, -1, -1, -1])  # 1/log2(1+3) = 0.5
    assert r.item.tolist() == pytest.approx([1.0, 0.5, -1, -1, -1, -1])  # SeqRec: item reward = rank
    assert r.valid.tolist() == [True, True, False, False, False, False]
    rank_d = 1 / L2(2) + 0.5 / L2(3) - 4          # invalid items add -1 undiscounted
    b5 = 1 + 1 / L2(3) ** 2 + 1 / L2(4) ** 2 + 1 / L2(5) ** 2 + 1 / L2(6) ** 2
    assert r.list_reward == pytest.approx(10 * (0.5 * rank_d / b5 + 0.5 * 1 / L2(0 + 2)))


def test_seqrec_list_task_uses_target_position_among_all_parsed_items():
    r = reward("seqrec", [-1, 3, 1], k=3, ranks=[0, 2, 0], target=1)
    rank_d = -1 + (1 / L2(5)) / L2(3) + 1 / L2(4)
    b3 = 1 + 1 / L2(3) ** 2 + 1 / 4
    assert r.list_reward == pytest.approx(10 * (0.5 * rank_d / b3 + 0.5 / L2(2 + 2)))
    absent = reward("seqrec", [3], k=3, ranks=[0])
    assert absent.list_reward == pytest.approx(10 * (0.5 * (1 / L2(3)) / b3 + 0))


def test_plus_c_item_and_list_rewards():
    # k = 4, C = A (|C| = 4), target 3; answer 0 (A, r 2), 3 (target), 2 (A, r 5), 5 (r 1).
    r = reward("+c", [0, 3, 2, 5], k=4, ranks=[2, 0, 5, 1], target=3)
    rank = [1 / L2(5), 1.0, 1 / L2(8), 1 / L2(4)]
    assert r.task.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert r.item.tolist() == pytest.approx([0.5 * x + 0.5 * t for x, t in zip(rank, [1, 0, 1, 0])])
    rank_d = rank[0] / 1 + rank[1] / L2(3) + rank[2] / 2 + rank[3] / L2(5)
    b4 = 1 + 1 / L2(3) ** 2 + 1 / 4 + 1 / L2(5) ** 2
    assert r.list_reward == pytest.approx(10 * (0.5 * rank_d / b4 + 0.5 * 1 / (min(4, 4) - 2 + 1)))


def test_minus_c_task_scores_and_list_task():
    r = reward("-c", [0, 3, 2, 5], k=4, ranks=[2, 0, 5, 1], target=3)
    assert r.task.tolist() == [0.0, 1.0, 0.0, 1.0]
    plus = reward("+c", [0, 3, 2, 5], k=4, ranks=[2, 0, 5, 1], target=3)
    # Same rank part; L_task = 1/(k - n_out + 1) = 1/3 for both lists here, so the list rewards agree.
    assert r.list_reward == pytest.approx(plus.list_reward)
    only_out = reward("-c", [3, 4, 5, 6], k=4)
    assert only_out.task.tolist() == [1.0, 1.0, 1.0, 1.0]
    expected_rank = sum((1 / L2(3)) / L2(i + 2) for i in range(4)) / normaliser(4)
    assert only_out.list_reward == pytest.approx(10 * (0.5 * expected_rank + 0.5 * 1 / (4 - 4 + 1)))


def test_invalid_items_score_minus_one_for_rank_and_task():
    # k = 3, history [4]: unknown, in history, repeat of 0, then idx >= k.
    r = reward("+c", [-1, 4, 0, 0, 1], k=3, history=[4])
    assert r.rank.tolist() == pytest.approx([-1.0, -1.0, 1 / L2(3), -1.0, -1.0])
    assert r.task.tolist() == [-1.0, -1.0, 1.0, -1.0, -1.0]
    assert r.item.tolist() == pytest.approx([-1, -1, 0.5 / L2(3) + 0.5, -1, -1])


def test_lp_rule_every_branch():
    # k = 5, m = 2, k - m = 3. in A: [1, 0, 1, 1, 0].
    r = reward("lp", [0, 3, 2, 1, 5], k=5, m=2)
    assert r.task.tolist() == [0.5, 1.0, 0.0, 0.0, 1.0]  # n_in<m -> .5; out -> 1; n_in=2, 3 -> 0; out -> 1
    assert r.list_reward == pytest.approx(10 * (0.5 * _rank_sum(5) + 0.5 * 1 / (abs(3 - 2) + 1)))
    r = reward("lp", [3, 4, 5, 6, 0], k=5, m=2)
    assert r.task.tolist() == [1.0, 1.0, 1.0, 0.5, 0.5]  # n_out = 4 > 3 -> 0.5 for in and out alike
    assert r.list_reward == pytest.approx(10 * (0.5 * _rank_sum(5) + 0.5 * 1.0))  # n_in = 1 <= 2


def test_mp_rule_every_branch():
    r = reward("mp", [3, 0, 1, 2, 5], k=5, m=2)
    assert r.task.tolist() == [0.5, 1.0, 1.0, 0.5, 0.5]  # out, n_out<3 -> .5; in -> 1; n_in = 3 > 2 -> .5
    assert r.list_reward == pytest.approx(10 * (0.5 * _rank_sum(5) + 0.5 * 1.0))
    r = reward("mp", [3, 4, 5], k=5, m=2)
    assert r.task.tolist() == [0.5, 0.5, 0.0]  # third out: n_out = 3, not < 3
    assert r.list_reward == pytest.approx(10 * (0.5 * _rank_sum(3) + 0.5 * 1 / (2 + 1)))


def test_ep_rule_every_branch():
    r = reward("ep", [0, 3, 1, 2, 4], k=5, m=2)
    assert r.task.tolist() == [1.0, 0.5, 1.0, 0.0, 1.0]  # in n_in<=2 -> 1; out n_in<2 -> .5; n_in 3 -> 0; out -> 1
    assert r.list_reward == pytest.approx(10 * (0.5 * _rank_sum(5) + 0.5 * 1 / (abs(3 - 2) + 1)))
    r = reward("ep", [3, 4, 5, 6], k=5, m=2)
    assert r.task.tolist() == [0.5, 0.5, 0.5, 0.0]  # n_out = 4 > k - m = 3 -> 0
    ep_exact = reward("ep", [0, 1, 3], k=5, m=2)
    assert ep_exact.list_reward == pytest.approx(10 * (0.5 * _rank_sum(3) + 0.5 * 1.0))


def _rank_sum(n, k=5):
    """sum over the first n positions of (1/log2(0+3)) / log2(idx+2), over B(k): every item with teacher rank 0."""
    return sum((1 / L2(3)) / L2(i + 2) for i in range(n)) / normaliser(k)


def test_ranking_item_outside_candidates_is_invalid():
    r = answer_reward(ControlRequest("ranking", 2), torch.tensor([1, 4]), torch.tensor([0, 0]), 1, [],
                      candidates=[0, 1, 2])
    assert r.item.tolist() == [1.0, -1.0]


def test_unknown_task_has_no_reward():
    with pytest.raises(ConfigError, match="no reward"):
        answer_reward(ControlRequest("category_re", 1), torch.tensor([0]), torch.tensor([0]), 0, [])


# ---- placement ----------------------------------------------------------------------------------------------------

class WordTokenizer:
    """A word/punctuation tokenizer with offsets (ids grow as new pieces appear); id 0 is an EOS special token."""

    all_special_ids = [0]

    def __init__(self):
        self.vocab = {"</s>": 0}

    def _id(self, piece):
        return self.vocab.setdefault(piece, len(self.vocab))

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        matches = list(re.finditer(r"\w+|[^\w\s]|\s+", text))
        return {"input_ids": [self._id(m.group()) for m in matches],
                "offset_mapping": [(m.start(), m.end()) for m in matches]}

    def decode(self, ids, skip_special_tokens=False):
        pieces = {v: k for k, v in self.vocab.items()}
        return "".join(pieces[i] for i in ids if not (skip_special_tokens and i == 0))


def test_token_rewards_on_the_last_token_of_each_item():
    tok = WordTokenizer()
    text = '1. "Alpha"\n2. "Charlie Delta"'
    # tokens: 1 . ␠ " Alpha " \n 2 . ␠ " Charlie ␠ Delta "  -> Alpha is token 4, Delta token 13 (the last is 14)
    out = token_rewards(text, tok, torch.tensor([0.25, -1.0]), list_reward=2.0)
    assert out.shape == (15,)
    expected = torch.zeros(15)
    expected[4], expected[13], expected[14] = 0.25, -1.0, 2.0
    assert torch.equal(out, expected)


def test_token_rewards_with_response_ids_ending_in_eos():
    tok = WordTokenizer()
    text = '1. "Echo"'
    ids = tok(text)["input_ids"] + [0]  # the generated EOS
    out = token_rewards(text, tok, torch.tensor([0.5]), list_reward=3.0, response_ids=ids)
    assert out.tolist() == [0, 0, 0, 0, 0.5, 0, 3.0]  # "Echo" is token 4; the list reward on the EOS


def test_list_only_placement():
    assert list_token_rewards(4, 1.5).tolist() == [0, 0, 0, 1.5]
    assert list_token_rewards(0, 1.5).numel() == 0


def test_token_rewards_on_smollm2_tokenizer_follow_offsets():
    from recalign.llm.models import smollm2_tokenizer

    tok = smollm2_tokenizer(progress=False)
    text = '1. "Charlie Delta"\n2. "Echo"\n'
    out = token_rewards(text, tok, torch.tensor([1.0, 2.0]))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert out.shape == (len(ids),)
    placed = torch.nonzero(out).flatten().tolist()
    assert len(placed) == 2 and out[placed].tolist() == [1.0, 2.0]
    for position, title in zip(placed, ["Charlie Delta", "Echo"]):
        # the reward token is the first whose decoded prefix holds the whole title
        assert tok.decode(ids[: position + 1]).endswith(title) or title in tok.decode(ids[: position + 1])
        assert tok.decode(ids[:position]).count(title) == 0


def test_mismatched_item_rewards_are_an_error():
    with pytest.raises(ConfigError, match="2 item rewards for 1 parsed titles"):
        token_rewards('1. "Alpha"', WordTokenizer(), torch.tensor([1.0, 2.0]))


# ---- the reward function the PPO trainer calls ------------------------------------------------------------------

class FakeTeacher:
    """ranks(): 0-based rank among all items of a fixed score vector (ties -> lower id)."""

    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])

    def ranks(self, histories, candidates, users=None):
        # the service validates plain lists of ints (its HTTP client sends them as JSON)
        for lists in (histories, candidates, [users]):
            assert isinstance(lists, list) and all(type(i) is int for row in lists for i in row)
        s = self.scores
        return (s[None, None, :] > s[torch.tensor(candidates)][..., None]).sum(-1)


def test_reward_fn_batches_rows_and_places_rewards():
    tok = WordTokenizer()
    rows = Rows(np.array([0, 1]), [[5], []], np.array([1, 3]),
                labels=[ControlRequest("seqrec", 2), ControlRequest("+c", 2, "A")])
    fn = make_reward_fn(rows, ["p0", "p1"], FakeTeacher(), TITLES, CATS, tok)
    fine = fn(["p1", "p0"], ["", ""], [tok('1. "Alpha"\n2. "Echo"')["input_ids"] + [0],
                                        tok('1. "Bravo"')["input_ids"]])
    # row 1 (+C, C = A, target 3): Alpha (A, teacher rank 0) then Echo (the target).
    item = [0.5 * 1 / L2(3) + 0.5 * 1, 0.5 * 1 + 0.5 * 0]
    rank_d = 1 / L2(3) + 1 / L2(3)
    list_r = 10 * (0.5 * rank_d / normaliser(2) + 0.5 * 1 / (2 - 1 + 1))
    assert fine[0][4].item() == pytest.approx(item[0])
    assert fine[0][11].item() == pytest.approx(item[1])
    assert fine[0][13].item() == pytest.approx(list_r)  # the EOS token
    assert len(fine[0]) == 14 and len(fine[1]) == 6
    assert fine[0].sum().item() == pytest.approx(sum(item) + list_r)
    # row 0 (SeqRec, target 1): Bravo is the target at position 0; the list reward on the closing quote.
    assert fine[1].tolist() == pytest.approx([0, 0, 0, 0, 1.0, 10 * (0.5 * 1 / normaliser(2) + 0.5 * 1)])
    list_only = make_reward_fn(rows, ["p0", "p1"], FakeTeacher(), TITLES, CATS, tok, fine_grained=False)
    coarse = list_only(["p1"], [""], [tok('1. "Alpha"\n2. "Echo"')["input_ids"] + [0]])
    assert coarse[0].tolist() == pytest.approx([0.0] * 13 + [list_r])
    with pytest.raises(ConfigError, match="no known row"):
        fn(["other"], [""], [[1]])


def test_reward_fn_uses_each_rows_own_category_rule_and_scores_empty_answers():
    tok = WordTokenizer()
    specs = [ControlRequest(t, 3, "A", p=34, m=1) for t in ("lp", "mp", "ep")]
    rows = Rows(np.array([0, 0, 0]), [[], [], []], np.array([6, 6, 6]), labels=specs)
    fn = make_reward_fn(rows, ["lp", "mp", "ep"], FakeTeacher(), TITLES, CATS, tok, fine_grained=False)
    answer = tok('1. "Alpha"\n2. "Bravo"\n3. "Echo"')["input_ids"]   # in A, in A, not in A
    lp, mp, ep = (r[-1].item() for r in fn(["lp", "mp", "ep"], [""] * 3, [answer] * 3))
    rank_part = 0.5 * (1 / L2(0 + 3) + 1 / L2(1 + 3) / L2(3) + 1 / L2(3 + 3) / L2(4)) / normaliser(3)  # ranks 0 1 3
    assert lp == pytest.approx(10 * (rank_part + 0.5 * 1 / (abs(2 - 1) + 1)))  # n_in 2 > m 1
    assert mp == pytest.approx(10 * (rank_part + 0.5 * 1.0))                     # n_in 2 >= 1
    assert ep == pytest.approx(10 * (rank_part + 0.5 * 1 / 2))                   # n_in 2 != 1
    empty = fn(["mp"], [""], [[0]])[0]  # only EOS: no items, L_task alone (n_in 0, m 1)
    assert empty.tolist() == pytest.approx([10 * 0.5 * 1 / (abs(0 - 1) + 1)])
    chatter = fn(["mp"], [""], [tok("Sorry.")["input_ids"]])[0]  # one line that names no catalog title: -1
    assert chatter.tolist() == pytest.approx([0.0, 10 * (0.5 * -1 / normaliser(3) + 0.5 * 1 / 2)])


def test_reward_fn_renders_the_prompts_itself():
    tok = WordTokenizer()
    tok.chat_template = None  # plain "role: content" prompts
    rows = Rows(np.array([0]), [[5]], np.array([1]), labels=[ControlRequest("seqrec", 1)])
    fn = make_reward_fn(rows, None, FakeTeacher(), TITLES, CATS, tok)
    prompt = 'user: The user has enjoyed these items, oldest first: "Golf"\n'
    out = fn([prompt + "Recommend 1 different items the user may like next. Answer with a numbered list of 1 titles "
              "in double quotes, one per line, best first.\nassistant: "], [""], [tok('1. "Bravo"')["input_ids"]])
    assert out[0].tolist() == pytest.approx([0, 0, 0, 0, 1.0, 10 * (0.5 * 1 + 0.5 * 1)])
