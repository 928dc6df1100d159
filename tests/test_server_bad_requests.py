"""Bad requests against both servers over a real 127.0.0.1 socket (uvicorn), the token on: malformed JSON, wrong
types, oversized bodies and histories, unknown items, missing or wrong tokens. Each is a 4xx whose JSON body says
what was wrong, and the server answers a good request correctly right after it."""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from recalign.data.dataset import build_dataset
from recalign.llm.tasks import SeqRecTask
from recalign.serve.app import DEFAULT_MAX_BODY_BYTES, serving_in_thread
from recalign.serve.llm import MAX_HISTORY_ITEMS, llm_app
from recalign.serve.teacher import create_teacher_app
from recalign.teachers.popularity import Popularity
from recalign.teachers.service import TeacherService

from conftest import TINY_INTERACTIONS, TINY_ITEMS

# tiny dataset: ids 0..4 = i1..i5; Mystery = {0, 1, 3}, Romance = {2, 3, 4}; popularity counts [2, 2, 3, 2, 2]
TOKEN = "s3cret"
NAME = "tiny-llm"
JSON = {"content-type": "application/json"}
TOO_BIG = DEFAULT_MAX_BODY_BYTES + 1


def _dataset():
    return build_dataset(TINY_INTERACTIONS, items=TINY_ITEMS, name="tiny", source="test")


@pytest.fixture(scope="module")
def teacher_url() -> Iterator[str]:
    dataset = _dataset()
    service = TeacherService(Popularity().fit(dataset, dataset.interactions, progress=False))
    with serving_in_thread(create_teacher_app(service, token=TOKEN)) as url:
        yield url


@pytest.fixture(scope="module")
def llm_url() -> Iterator[str]:
    from recalign.llm.models import tiny_model

    model, tokenizer = tiny_model(seed=0)
    app = llm_app(model, tokenizer, _dataset(), SeqRecTask(max_history=5), name=NAME, token=TOKEN, max_wait_ms=0)
    with serving_in_thread(app) as url:
        yield url


def send(url: str, method: str, path: str, *, json=None, content=None, token: str | None = TOKEN,
         headers: dict | None = None) -> httpx.Response:
    """One request; `token` None sends no Authorization header."""
    sent = dict(headers or {})
    if token is not None and "Authorization" not in sent:
        sent["Authorization"] = f"Bearer {token}"
    return httpx.request(method, f"{url}{path}", json=json, content=content, headers=sent, timeout=60)


def chunked(size: int, chunk: int = 2**20) -> Iterator[bytes]:
    """`size` bytes in chunks: httpx sends them without a Content-Length (chunked transfer encoding)."""
    for start in range(0, size, chunk):
        yield b" " * min(chunk, size - start)


def assert_refused(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert fragment in response.json()["error"]


# ---- the teacher ---------------------------------------------------------------------------------------------------
GOOD_INFERENCE = {"item_lists": [[0]], "k": 2}  # item 2 is the most popular; then 1 (lowest id of the count-2 ties)

TEACHER_BAD = [
    pytest.param("POST", "/inference", {"content": b"{not json", "headers": JSON}, 422, "invalid JSON body",
                 id="malformed-json"),
    pytest.param("POST", "/inference", {"content": b'{"item_lists": [[0]], "k": 2', "headers": JSON}, 422,
                 "invalid JSON body", id="truncated-json"),
    pytest.param("POST", "/inference", {"json": [[0], 2]}, 422, "field 'body'", id="json-array-not-object"),
    pytest.param("POST", "/inference", {"json": {"item_lists": [["0"]], "k": 2}}, 422, "body.item_lists.0.0",
                 id="string-item-id"),
    pytest.param("POST", "/inference", {"json": {"item_lists": [[0]], "k": "2"}}, 422, "body.k", id="string-k"),
    pytest.param("POST", "/inference", {"json": {"item_lists": [[0.5]], "k": 2}}, 422, "body.item_lists.0.0",
                 id="float-item-id"),
    pytest.param("POST", "/inference", {"json": {"item_lists": [[2**63]], "k": 2}}, 422,
                 "less than or equal to 9223372036854775807", id="id-beyond-int64"),
    pytest.param("POST", "/ranking", {"json": {"item_lists": [[0]], "candidate_item_lists": "1"}}, 422,
                 "body.candidate_item_lists", id="candidates-not-a-list"),
    pytest.param("POST", "/inference", {"content": b" " * TOO_BIG, "headers": JSON}, 413,
                 f"larger than the server's limit of {DEFAULT_MAX_BODY_BYTES} bytes", id="oversized-body"),
    pytest.param("POST", "/inference", {"content": chunked(TOO_BIG), "headers": JSON}, 413,
                 f"larger than the server's limit of {DEFAULT_MAX_BODY_BYTES} bytes", id="oversized-chunked-body"),
    pytest.param("POST", "/inference", {"json": {"item_lists": [[0]] * 20481, "k": 1}}, 422,
                 "body.item_lists': List should have at most 20480 items", id="too-many-histories"),
    pytest.param("POST", "/inference", {"json": {"item_lists": [[0, 7]], "k": 2}}, 400,
                 "unknown history item id(s) 7 (items are 0..4)", id="unknown-history-item"),
    pytest.param("POST", "/inference", {"json": {"item_lists": [[-1]], "k": 2}}, 400,
                 "unknown history item id(s) -1", id="negative-item-id"),
    pytest.param("POST", "/ranking", {"json": {"item_lists": [[0]], "candidate_item_lists": [[1, 99]]}}, 400,
                 "unknown candidate item id(s) 99", id="unknown-candidate"),
    pytest.param("POST", "/inference", {"json": {"item_lists": [[0]], "k": 2, "users": [3]}}, 400,
                 "unknown user id 3", id="unknown-user"),
    pytest.param("POST", "/inference", {"json": {"item_lists": [[0]], "k": 2, "target_category": ["-Horror"]}}, 400,
                 "unknown category 'Horror'", id="unknown-category"),
    pytest.param("POST", "/inference", {"json": GOOD_INFERENCE, "token": None}, 401, "missing bearer token",
                 id="missing-token"),
    pytest.param("POST", "/ranking", {"json": {"item_lists": [[0]], "candidate_item_lists": [[1]]}, "token": "nope"},
                 403, "wrong bearer token", id="wrong-token"),
    pytest.param("POST", "/inference", {"json": GOOD_INFERENCE, "headers": {"Authorization": f"Basic {TOKEN}"}},
                 401, "missing bearer token", id="not-a-bearer-token"),
    pytest.param("POST", "/inference", {"json": GOOD_INFERENCE, "headers": {"Authorization": "Bearer"}}, 401,
                 "missing bearer token", id="empty-bearer-token"),
]


@pytest.mark.parametrize("method, path, request_kwargs, status, fragment", TEACHER_BAD)
def test_teacher_refuses_bad_requests_and_keeps_serving(teacher_url, method, path, request_kwargs, status,
                                                        fragment):
    assert_refused(send(teacher_url, method, path, **request_kwargs), status, fragment)
    good = send(teacher_url, "POST", "/inference", json=GOOD_INFERENCE)
    assert good.status_code == 200 and good.json() == {"inference": [[2, 1]]}


# ---- the LLM server ------------------------------------------------------------------------------------------------
GOOD_RECOMMEND = {"history": [0, "Silent Garden 2"], "k": 3}  # 5 items, 2 in the history: exactly the other 3


def completion(**fields) -> dict:
    return {"json": {"model": NAME, "prompt": "A book:", "max_tokens": 2, **fields}}


LLM_BAD = [
    pytest.param("POST", "/v1/recommend", {"content": b"{not json", "headers": JSON}, 422, "invalid JSON body",
                 id="malformed-json"),
    pytest.param("POST", "/v1/chat/completions", {"content": b'{"model": "x", "messages": [', "headers": JSON}, 422,
                 "invalid JSON body", id="truncated-json"),
    pytest.param("POST", "/v1/recommend", {"json": "history"}, 422, "field 'body'", id="json-string-not-object"),
    pytest.param("POST", "/v1/recommend", {"json": {"history": "i1", "k": 1}}, 422, "body.history",
                 id="history-not-a-list"),
    pytest.param("POST", "/v1/recommend", {"json": {"history": [0], "k": "3"}}, 422, "body.k", id="string-k"),
    pytest.param("POST", "/v1/recommend", {"json": {"history": [0.5], "k": 1}}, 422, "body.history.0",
                 id="float-item"),
    pytest.param("POST", "/v1/chat/completions", {"json": {"model": NAME, "messages": [{"role": "user",
                                                                                       "content": 5}]}},
                 422, "body.messages.0.content", id="number-message-content"),
    pytest.param("POST", "/v1/chat/completions", {"json": {"model": NAME, "messages": [{"role": "robot",
                                                                                       "content": "hi"}]}},
                 422, "body.messages.0.role", id="unknown-role"),
    pytest.param("POST", "/v1/completions", completion(prompt=5), 422, "body.prompt", id="number-prompt"),
    pytest.param("POST", "/v1/completions", completion(prompt=""), 422, "at least 1 character", id="empty-prompt"),
    pytest.param("POST", "/v1/completions", completion(max_tokens=100000), 422, "body.max_tokens",
                 id="max-tokens-too-large"),
    pytest.param("POST", "/v1/completions", completion(seed=2**70), 422, "body.seed", id="seed-too-large"),
    pytest.param("POST", "/v1/recommend", {"content": b" " * TOO_BIG, "headers": JSON}, 413,
                 f"larger than the server's limit of {DEFAULT_MAX_BODY_BYTES} bytes", id="oversized-body"),
    pytest.param("POST", "/v1/completions", {"content": chunked(TOO_BIG), "headers": JSON}, 413,
                 f"larger than the server's limit of {DEFAULT_MAX_BODY_BYTES} bytes", id="oversized-chunked-body"),
    pytest.param("POST", "/v1/recommend", {"json": {"history": [0] * (MAX_HISTORY_ITEMS + 1), "k": 1}}, 422,
                 f"body.history': List should have at most {MAX_HISTORY_ITEMS} items", id="oversized-history"),
    pytest.param("POST", "/v1/completions", completion(prompt="book " * 3000), 400,
                 "exceeds the model's context of 2048 tokens", id="prompt-beyond-context"),
    pytest.param("POST", "/v1/recommend", {"json": {"history": [99], "k": 1}}, 400,
                 "unknown history item id 99 (ids are 0..4)", id="unknown-item-id"),
    pytest.param("POST", "/v1/recommend", {"json": {"history": ["No Such Book"], "k": 1}}, 400,
                 "unknown history item 'No Such Book'", id="unknown-title"),
    pytest.param("POST", "/v1/recommend", {"json": {"history": [0], "k": 1, "candidates": ["i9"]}}, 400,
                 "unknown candidate item 'i9'", id="unknown-candidate"),
    pytest.param("POST", "/v1/recommend", {"json": {"history": [0], "k": 1, "control": "+Horror"}}, 400,
                 "unknown category 'Horror'", id="unknown-category"),
    pytest.param("POST", "/v1/completions", completion(model="gpt-4"), 400, "unknown model 'gpt-4'",
                 id="unknown-model"),
    pytest.param("POST", "/v1/recommend", {"json": GOOD_RECOMMEND, "token": None}, 401, "missing bearer token",
                 id="missing-token"),
    pytest.param("GET", "/v1/models", {"token": None}, 401, "missing bearer token", id="models-missing-token"),
    pytest.param("POST", "/v1/chat/completions", {"json": {"model": NAME, "messages": [{"role": "user",
                                                                                       "content": "hi"}]},
                                                  "token": "nope"}, 403, "wrong bearer token", id="wrong-token"),
    pytest.param("POST", "/v1/recommend", {"json": GOOD_RECOMMEND, "headers": {"Authorization": TOKEN}}, 401,
                 "missing bearer token", id="token-without-bearer"),
]


@pytest.mark.parametrize("method, path, request_kwargs, status, fragment", LLM_BAD)
def test_llm_server_refuses_bad_requests_and_keeps_serving(llm_url, method, path, request_kwargs, status, fragment):
    assert_refused(send(llm_url, method, path, **request_kwargs), status, fragment)
    good = send(llm_url, "POST", "/v1/recommend", json=GOOD_RECOMMEND)
    assert good.status_code == 200, good.text
    assert sorted(item["id"] for item in good.json()["items"]) == [2, 3, 4]


def test_tiny_temperature_is_greedy_not_a_500(llm_url):
    """logits / 1e-300 would overflow to inf; below MIN_TEMPERATURE the answer is the greedy one."""
    greedy = send(llm_url, "POST", "/v1/completions", **completion(max_tokens=4, temperature=0))
    tiny = send(llm_url, "POST", "/v1/completions", **completion(max_tokens=4, temperature=1e-300, seed=3))
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
