"""The LLM server over 127.0.0.1: the official openai client (models, chat, completions), /v1/recommend (catalog
items only, -C honoured, history excluded), auth, 4xx for bad bodies, and batched answers equal sequential ones."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from recalign.data.dataset import build_dataset
from recalign.llm.tasks import SeqRecTask
from recalign.serve.app import serving_in_thread
from recalign.serve.llm import llm_app

from conftest import TINY_INTERACTIONS, TINY_ITEMS

# tiny dataset: ids 0..4 = i1..i5; Mystery = {0, 1, 3}, Romance = {2, 3, 4}
TOKEN = "s3cret"
NAME = "tiny-llm"


@pytest.fixture(scope="module")
def served():
    from recalign.llm.models import tiny_model

    model, tokenizer = tiny_model(seed=0)
    dataset = build_dataset(TINY_INTERACTIONS, items=TINY_ITEMS, name="tiny", source="test")
    app = llm_app(model, tokenizer, dataset, SeqRecTask(max_history=5), name=NAME, token=TOKEN, max_wait_ms=200)
    with serving_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=TOKEN, max_retries=0, timeout=60)


def post(url: str, path: str, body, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


def test_openai_client_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_openai_chat_completion_counts_usage(client, served):
    answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Recommend a book"}],
                                            max_tokens=5, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    text = answer.choices[0].message.content
    engine = served[1].state.engine
    prompt = engine.chat_prompt(engine_messages("Recommend a book"))
    assert "Recommend a book" in prompt and prompt != "Recommend a book"  # the chat template was applied
    assert answer.usage.prompt_tokens == len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= answer.usage.completion_tokens <= 5
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    again = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Recommend a book"}],
                                           max_tokens=5, temperature=0)
    assert again.choices[0].message.content == text  # greedy is deterministic


def engine_messages(content: str):
    from recalign.serve.llm import ChatMessage

    return [ChatMessage(role="user", content=content)]


def test_openai_completion_one_choice_per_prompt(client):
    answer = client.completions.create(model=NAME, prompt=["Hello", "A book:"], max_tokens=3, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.usage.prompt_tokens == 1 + 3  # "Hello" is one SmolLM2 token, "A book:" three
    single = client.completions.create(model=NAME, prompt="A book:", max_tokens=3, temperature=0)
    assert single.choices[0].text == answer.choices[1].text  # batched with another prompt or alone: same text


def test_openai_client_sees_unknown_model_as_4xx(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="other", prompt="x", max_tokens=2)
    assert "unknown model 'other'" in caught.value.response.json()["error"]


def test_recommend_returns_catalog_items_without_history(served):
    url, _ = served
    answer = post(url, "/v1/recommend", {"history": [0, "Silent Garden 2"], "k": 3})
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert len(items) == 3  # 5 items, 2 in the history: exactly the other 3
    assert sorted(i["id"] for i in items) == [2, 3, 4]
    titles = {2: "Golden Empire 3", 3: "Hidden River 4", 4: "Broken Mirror 5"}
    assert all(i["title"] == titles[i["id"]] for i in items)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)


def test_recommend_minus_category_never_returns_it(served):
    url, _ = served
    answer = post(url, "/v1/recommend", {"history": ["i3"], "k": 5, "control": "-Romance"})
    assert answer.status_code == 200, answer.text
    assert sorted(i["id"] for i in answer.json()["items"]) == [0, 1]  # the items with no Romance category
    plus = post(url, "/v1/recommend", {"history": [0], "k": 5, "control": "+Mystery"}).json()["items"]
    assert sorted(i["id"] for i in plus) == [1, 3]  # Mystery minus the history item 0


def test_recommend_candidates_limit_the_answer(served):
    url, _ = served
    answer = post(url, "/v1/recommend", {"history": [4], "k": 2, "candidates": [1, 2, 4]})
    assert sorted(i["id"] for i in answer.json()["items"]) == [1, 2]


def test_auth_missing_401_wrong_403(served):
    url, _ = served
    body = {"history": [0], "k": 1}
    missing = post(url, "/v1/recommend", body, token=None)
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
    assert post(url, "/v1/recommend", body, token="wrong").status_code == 403
    assert httpx.get(f"{url}/v1/models").status_code == 401
    bad_client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        bad_client.models.list()


@pytest.mark.parametrize("body, status, message", [
    ({"history": [0], "k": 0}, 422, "body.k"),
    ({"history": "i1", "k": 1}, 422, "body.history"),
    ({"history": [99], "k": 1}, 400, "unknown history item id 99"),
    ({"history": ["No Such Book"], "k": 1}, 400, "unknown history item 'No Such Book'"),
    ({"history": [0], "k": 1, "control": "-Horror"}, 400, "unknown category 'Horror'"),
    ({"history": [0], "k": 1, "control": "Romance"}, 400, "control must look like"),
    ({"history": [0], "k": 1, "candidates": [7]}, 400, "unknown candidate item id 7"),
    ({"history": [0], "k": 1, "extra": 1}, 422, "body.extra"),
])
def test_bad_recommend_bodies_are_4xx_with_a_message(served, body, status, message):
    answer = post(served[0], "/v1/recommend", body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_bad_openai_bodies_are_4xx(served):
    url, _ = served
    assert post(url, "/v1/chat/completions", {"model": NAME, "messages": []}).status_code == 422
    assert post(url, "/v1/completions", {"model": NAME, "prompt": "x", "n": 2}).status_code == 422
    assert post(url, "/v1/completions", {"model": NAME, "prompt": "x", "stream": True}).status_code == 422
    malformed = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30,
                           headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert malformed.status_code == 422 and "invalid JSON" in malformed.json()["error"]
    assert post(url, "/v1/recommend", {"history": [0], "k": 1}).status_code == 200  # still serving


def test_concurrent_recommendations_equal_sequential_ones(served):
    url, app = served
    bodies = [{"history": [0, 1], "k": 2}, {"history": [2], "k": 2}, {"history": [4, 3], "k": 2},
              {"history": [1], "k": 2, "control": "-Mystery"}, {"history": [3], "k": 2}]
    sequential = [post(url, "/v1/recommend", b).json()["items"] for b in bodies]
    batches_before = app.state.batcher.batches

    async def together():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            answers = await asyncio.gather(*(http.post(f"{url}/v1/recommend", json=b) for b in bodies))
        return [a.json()["items"] for a in answers]

    concurrent = asyncio.run(together())
    assert [[i["id"] for i in row] for row in concurrent] == [[i["id"] for i in row] for row in sequential]
    for row, expected in zip(concurrent, sequential):
        assert [i["score"] for i in row] == pytest.approx([i["score"] for i in expected], abs=1e-4)
    assert app.state.batcher.batches - batches_before < len(bodies)  # some requests shared a batch


def test_cli_serve_llm_refuses_bad_folders_and_public_binds(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from recalign.cli import app as cli_app

    monkeypatch.delenv("RECALIGN_TOKEN", raising=False)
    runner = CliRunner()
    public = runner.invoke(cli_app, ["serve", "llm", str(tmp_path), "--host", "0.0.0.0"])
    assert public.exit_code == 2 and "needs a bearer token" in public.output
    missing = runner.invoke(cli_app, ["serve", "llm", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and missing.output.startswith("recalign: error:")
    not_stage = runner.invoke(cli_app, ["serve", "llm", str(tmp_path)])
    assert not_stage.exit_code == 2 and "not a finished stage folder" in not_stage.output


def test_llm_app_from_stage_serves_the_saved_adapter(tmp_path):
    import pandas as pd

    from recalign.recipes import recipe_from_dict
    from recalign.runs import run_recipe
    from recalign.serve.llm import llm_app_from_stage

    frame = pd.DataFrame([(f"u{u}", f"i{(u + t) % 6}", t) for u in range(4) for t in range(4)],
                         columns=["user", "item", "timestamp"])
    titles = ["Alpha Road", "Beta Lake", "Gamma Hill", "Delta Wood", "Echo Bay", "Foxtrot Peak"]
    items = pd.DataFrame({"item": [f"i{i}" for i in range(6)], "title": titles,
                          "categories": [["A"], ["A"], ["B"], ["B"], ["A", "B"], ["C"]]})
    build_dataset(frame, items=items, name="toy", source="test").save(tmp_path / "data")
    params = {"model": "tiny", "train_rows": 2, "batch_size": 2, "task": {"max_history": 3},
              "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "sft": {"max_steps": 1, "batch_size": 2, "max_length": 160},
              "generation": {"max_new_tokens": 4}, "grounding": {"kind": "fuzzy"}}
    recipe = recipe_from_dict({"name": "toyllm", "seed": 1, "data": {"path": str(tmp_path / "data")},
                               "eval": {"ks": [1], "users": 2},
                               "stages": [{"name": "sft", "kind": "llm-sft", "params": params}]})
    run_recipe(recipe, tmp_path / "run", progress=False)
    with serving_in_thread(llm_app_from_stage(tmp_path / "run" / "stages" / "sft")) as url:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        answer = httpx.post(f"{url}/v1/recommend", json={"history": ["Alpha Road", 1], "k": 3, "control": "-B"},
                            timeout=60)
    assert [m["id"] for m in models] == ["toyllm/sft"]
    assert answer.status_code == 200, answer.text
    assert sorted(i["title"] for i in answer.json()["items"]) == ["Foxtrot Peak"]  # not A-history, not B


def test_recommend_with_nothing_left_is_an_empty_list(served):
    url, _ = served
    # -Mystery leaves {2, 4}; both are history
    answer = post(url, "/v1/recommend", {"history": [2, 4], "k": 3, "control": "-Mystery"})
    assert answer.status_code == 200 and answer.json()["items"] == []
    one = post(url, "/v1/recommend", {"history": [], "k": 3, "candidates": ["Broken Mirror 5"]})
    assert [i["id"] for i in one.json()["items"]] == [4]


def test_too_long_prompt_is_a_400_not_a_500(served):
    url, _ = served
    answer = post(url, "/v1/completions", {"model": NAME, "prompt": "book " * 3000, "max_tokens": 4})
    assert answer.status_code == 400 and "exceeds the model's context of 2048 tokens" in answer.json()["error"]


def test_grounded_decoding_returns_allowed_catalog_items(served):
    url, _ = served
    answer = post(url, "/v1/recommend", {"history": [0], "k": 5, "control": "-Romance", "decoding": "grounded"})
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert [i["id"] for i in items] == [1]  # Mystery-only items {0, 1} minus the history
    assert 0.0 <= items[0]["score"] <= 1.0
    four = post(url, "/v1/recommend", {"history": [2], "k": 4, "decoding": "grounded"}).json()["items"]
    assert sorted(i["id"] for i in four) == [0, 1, 3, 4]
    scores = [i["score"] for i in four]
    assert scores == sorted(scores, reverse=True)
