"""The teacher over HTTP on 127.0.0.1: the §1.3 JSON shapes, every row served, 4xx for bad requests, auth, batching."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from recalign.cli import app as cli_app
from recalign.data.dataset import build_dataset
from recalign.data.sources.synthetic import SyntheticSourceConfig, generate_synthetic
from recalign.errors import ConfigError, RecalignError, RequestError
from recalign.serve.app import TOKEN_ENV, MicroBatcher, is_loopback, serving_in_thread, server_token
from recalign.serve.teacher import create_teacher_app
from recalign.teachers import client as client_module
from recalign.teachers.client import TeacherClient, teacher_from_spec
from recalign.teachers.popularity import Popularity
from recalign.teachers.sasrec import SASRec
from recalign.teachers.service import TeacherService

from conftest import TINY_INTERACTIONS, TINY_ITEMS

# tiny dataset: Mystery = {0, 1, 3}, Romance = {2, 3, 4}; popularity counts [2, 2, 3, 2, 2]


@pytest.fixture(scope="module")
def popularity() -> TeacherService:
    dataset = build_dataset(TINY_INTERACTIONS, items=TINY_ITEMS, name="tiny", source="test")
    return TeacherService(Popularity().fit(dataset, dataset.interactions, progress=False))


@pytest.fixture(scope="module")
def sasrec() -> TeacherService:
    data = generate_synthetic(SyntheticSourceConfig(n_users=80, n_items=30, n_categories=3, min_length=5, max_length=12,
                                               seed=4))
    return TeacherService(SASRec(epochs=1, dim=16, max_len=20, seed=0).fit(data, data.interactions, progress=False))


@pytest.fixture(scope="module")
def tiny_server(popularity):
    with serving_in_thread(create_teacher_app(popularity)) as url:
        yield url


@pytest.fixture(scope="module")
def sasrec_server(sasrec):
    app = create_teacher_app(sasrec, max_wait_ms=150)
    with serving_in_thread(app) as url:
        yield url, app


def test_inference_serves_every_row_by_hand(tiny_server):
    body = {"users": [0, 1, 2, 0], "item_lengths": [1, 2, 0, 1], "item_lists": [[0], [2, 3], [], [2]], "k": 3,
            "target_category": ["+Romance", "-Romance", None, None]}
    answer = httpx.post(f"{tiny_server}/inference", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"inference": [[2, 3, 4], [0, 1], [2, 0, 1], [0, 1, 3]]}  # row 2: only {0, 1} eligible
    candidates = {"item_lists": [[0], [2]], "k": 2, "candidate_item_lists": [[4, 1, 0], None], "immediately": 1}
    assert httpx.post(f"{tiny_server}/inference", json=candidates).json() == {"inference": [[1, 4], [0, 1]]}
    keep = {"item_lists": [[2]], "k": 2, "exclude_history": False}
    assert httpx.post(f"{tiny_server}/inference", json=keep).json() == {"inference": [[2, 0]]}


def test_ranking_by_hand(tiny_server):
    body = {"users": [0, 1], "item_lists": [[0], [2]], "candidate_item_lists": [[0, 2, 4], [1]], "k": 3}
    for immediately in (0, 1):
        answer = httpx.post(f"{tiny_server}/ranking", json={**body, "immediately": immediately})
        assert answer.json() == {"ranking": [[1, 0, 4], [2]]}  # order 2, 0, 1, 3, 4; history kept


@pytest.mark.parametrize("payload, status, fragment", [
    (b"{not json", 422, "invalid JSON"),
    (b'{"item_lists": [[0]]}', 422, "body.k"),
    (b'{"item_lists": [[0, 7]], "k": 2}', 400, "unknown history item id(s) 7"),
    (b'{"item_lists": [[0]], "k": 2, "candidate_item_lists": [[99]]}', 400, "unknown candidate item id(s) 99"),
    (b'{"item_lists": [[0]], "k": 2, "target_category": ["+Horror"]}', 400, "unknown category 'Horror'"),
    (b'{"item_lists": [[0]], "k": 2, "target_category": ["Romance"]}', 400, "'+Name' or '-Name'"),
    (b'{"item_lists": [[0]], "k": 2, "users": [9]}', 400, "unknown user id 9"),
    (b'{"item_lists": [[0]], "k": 0}', 422, "body.k"),
    (b'{"item_lists": [["0"]], "k": 2}', 422, "body.item_lists.0.0"),
    (b'{"item_lists": [[0, 1]], "item_lengths": [3], "k": 2}', 422, "item_lengths[0] is 3"),
    (b'{"item_lists": [[0], [1]], "k": 2, "target_category": ["+Romance"]}', 422, "target_category has 1 rows"),
    (b'{"item_lists": [], "k": 2}', 422, "body.item_lists"),
    (b'{"item_lists": [[0]], "k": 2, "colour": 1}', 422, "body.colour"),
])
def test_bad_inference_requests_are_4xx_with_a_message(tiny_server, payload, status, fragment):
    answer = httpx.post(f"{tiny_server}/inference", content=payload, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert fragment in answer.json()["error"]


def test_bad_ranking_requests_are_4xx(tiny_server):
    missing = httpx.post(f"{tiny_server}/ranking", json={"item_lists": [[0]]})
    assert missing.status_code == 422 and "candidate_item_lists" in missing.json()["error"]
    unknown = httpx.post(f"{tiny_server}/ranking", json={"item_lists": [[0]], "candidate_item_lists": [[5]]})
    assert unknown.status_code == 400 and "5" in unknown.json()["error"]


def test_token_missing_wrong_and_right(popularity):
    with serving_in_thread(create_teacher_app(popularity, token="s3cret")) as url:
        body = {"item_lists": [[0]], "k": 1}
        missing = httpx.post(f"{url}/inference", json=body)
        assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
        wrong = httpx.post(f"{url}/ranking", json={**body, "candidate_item_lists": [[1]]},
                           headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and "wrong bearer token" in wrong.json()["error"]
        right = httpx.post(f"{url}/inference", json=body, headers={"Authorization": "Bearer s3cret"})
        assert right.json() == {"inference": [[2]]}
        assert httpx.get(f"{url}/health").json()["status"] == "ok"  # health needs no token
        with TeacherClient(url, token="s3cret") as client:
            assert client.topk([[0]], 1).tolist() == [[2]]
        with TeacherClient(url) as client, pytest.raises(RequestError, match="401"):
            client.topk([[0]], 1)


def _random_rows(service: TeacherService, n: int, seed: int) -> tuple[list, list]:
    gen = np.random.default_rng(seed)
    histories = [gen.choice(service.n_items, size=int(gen.integers(0, 12)), replace=False).tolist()
                 for _ in range(n)]
    candidates = [gen.choice(service.n_items, size=6, replace=False).tolist() for _ in range(n)]
    return histories, candidates


def test_ranking_equals_in_process_batched_and_immediate(sasrec, sasrec_server):
    url, _ = sasrec_server
    histories, candidates = _random_rows(sasrec, 20, seed=0)
    expected = sasrec.ranks(histories, candidates).tolist()
    for immediately in (0, 1):
        body = {"item_lists": histories, "candidate_item_lists": candidates, "immediately": immediately}
        assert httpx.post(f"{url}/ranking", json=body).json() == {"ranking": expected}


def test_concurrent_requests_are_batched_with_the_same_answers(sasrec, sasrec_server):
    """40 concurrent single-row requests of mixed kinds: fewer model calls than requests, answers as in process."""
    url, app = sasrec_server
    histories, candidates = _random_rows(sasrec, 40, seed=1)
    categories = [None, f"+{sasrec.categories[0]}", f"-{sasrec.categories[1]}", None]
    bodies, expected = [], []
    for row, (history, cand) in enumerate(zip(histories, candidates)):
        if row % 5 == 4:
            bodies.append(("/ranking", {"item_lists": [history], "candidate_item_lists": [cand]}))
            expected.append({"ranking": sasrec.ranks([history], [cand]).tolist()})
            continue
        category = categories[row % 4]
        body = {"item_lists": [history], "k": 3 + row % 4, "target_category": [category],
                "exclude_history": row % 3 != 0}
        if row % 4 == 3:
            body["candidate_item_lists"] = [cand]
        top = sasrec.topk([history], body["k"], candidates=body.get("candidate_item_lists"), categories=[category],
                          exclude_history=body["exclude_history"])
        bodies.append(("/inference", body))
        expected.append({"inference": [[i for i in top[0].tolist() if i >= 0]]})

    async def drive(immediately: int) -> list:
        async with httpx.AsyncClient(base_url=url) as client:
            answers = await asyncio.gather(*(client.post(path, json={**body, "immediately": immediately})
                                             for path, body in bodies))
        return [a.json() for a in answers]

    batcher = app.state.batcher
    before = (batcher.batches, batcher.jobs)
    batched = asyncio.run(drive(0))
    assert batched == expected
    assert batcher.jobs - before[1] == 40
    assert batcher.batches - before[0] < 40  # some requests shared a model call
    assert asyncio.run(drive(1)) == expected
    assert batcher.jobs - before[1] == 40  # the immediate path bypasses the batcher


def test_client_matches_service(sasrec, sasrec_server):
    url, _ = sasrec_server
    histories, candidates = _random_rows(sasrec, 8, seed=2)
    mixed = [c if i % 2 else None for i, c in enumerate(candidates)]
    categories = [None, f"+{sasrec.categories[0]}"] * 4
    for immediately in (True, False):
        with TeacherClient(url, immediately=immediately) as client:
            assert torch.equal(client.topk(histories, 4, candidates=mixed, categories=categories),
                               sasrec.topk(histories, 4, candidates=mixed, categories=categories))
            assert torch.equal(client.topk(histories, 50), sasrec.topk(histories, 50))  # -1 padded like in process
            assert torch.equal(client.ranks(histories, candidates), sasrec.ranks(histories, candidates))
            with pytest.raises(RequestError, match="unknown category 'Nope'"):
                client.topk(histories, 2, categories=["+Nope"] * 8)


def test_client_cuts_long_histories_like_the_service(sasrec, sasrec_server):
    url, _ = sasrec_server
    history = list(range(14))
    with TeacherClient(url) as client:
        assert torch.equal(client.topk([history], 5, exclude_history=False),
                           sasrec.topk([history[-10:]], 5, exclude_history=False))


def test_client_reports_an_unreachable_server():
    with TeacherClient("http://127.0.0.1:9", timeout=2) as client, pytest.raises(RecalignError, match="unreachable"):
        client.topk([[0]], 1)


def test_teacher_from_spec(tmp_path, popularity, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "abc")
    client = teacher_from_spec("http://127.0.0.1:12621")
    assert isinstance(client, TeacherClient) and client._http.headers["authorization"] == "Bearer abc"
    client.close()
    popularity.teacher.save(tmp_path / "stages" / "pop" / "model")
    by_name = teacher_from_spec("pop", run_dir=tmp_path)
    by_path = teacher_from_spec(tmp_path / "stages" / "pop")
    assert by_name.topk([[0]], 2).tolist() == by_path.topk([[0]], 2).tolist() == [[2, 1]]
    with pytest.raises(RecalignError, match="neither an http"):
        teacher_from_spec("nothing", run_dir=tmp_path)
    assert client_module.TOKEN_ENV == TOKEN_ENV


def test_loopback_and_token_rule(monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert server_token("127.0.0.1") is None
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        server_token("0.0.0.0")
    monkeypatch.setenv(TOKEN_ENV, "t")
    assert server_token("0.0.0.0") == "t"


def test_cli_refuses_off_loopback_without_token(tmp_path, popularity, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    stage = tmp_path / "stages" / "pop"
    popularity.teacher.save(stage / "model")
    result = CliRunner().invoke(cli_app, ["serve", "teacher", str(stage), "--host", "0.0.0.0"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("recalign: error: ") and TOKEN_ENV in lines[0]
    missing = CliRunner().invoke(cli_app, ["serve", "teacher", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such teacher stage folder" in missing.stderr
    not_stage = CliRunner().invoke(cli_app, ["serve", "teacher", str(tmp_path)])
    assert not_stage.exit_code == 2 and "not a teacher stage" in not_stage.stderr
    assert "/inference" in CliRunner().invoke(cli_app, ["serve", "teacher", "--help"]).output


def test_micro_batcher_gathers_and_splits():
    calls: list[list[int]] = []

    def run(jobs: list[int]) -> list[int]:
        calls.append(list(jobs))
        if -1 in jobs:
            raise ValueError("boom")
        return [job * 10 for job in jobs]

    async def burst(batcher: MicroBatcher, jobs: list[int]) -> list:
        return await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)

    batcher = MicroBatcher(run, max_wait_ms=200, max_rows=3)
    assert asyncio.run(burst(batcher, [1, 2, 3, 4, 5])) == [10, 20, 30, 40, 50]
    assert calls == [[1, 2, 3], [4, 5]]  # max_rows 3 closes the first batch; the rest wait at most 200 ms
    calls.clear()
    failed = asyncio.run(burst(batcher, [7, -1]))
    assert calls == [[7, -1]] and all(isinstance(f, ValueError) for f in failed)  # one failure fails its batch
    assert asyncio.run(batcher.run_now(6)) == 60
    batcher.close()


def test_micro_batcher_loses_no_job_and_respects_max_rows():
    """Jobs of 1-4 rows arriving at random moments with a 1 ms window: every job answered once, batches <= 6 rows
    unless a single job is larger."""
    sizes: list[int] = []

    def run(jobs: list[tuple[int, int]]) -> list[int]:
        sizes.append(sum(rows for _, rows in jobs))
        return [index for index, _ in jobs]

    gen = np.random.default_rng(0)
    jobs = [(index, int(gen.integers(1, 5))) for index in range(150)] + [(150, 9)]
    delays = gen.uniform(0, 0.004, size=len(jobs))

    async def one(batcher: MicroBatcher, job: tuple[int, int], delay: float) -> int:
        await asyncio.sleep(delay)
        return await batcher.submit(job)

    async def burst() -> list[int]:
        batcher = MicroBatcher(run, rows=lambda job: job[1], max_wait_ms=1, max_rows=6)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(batcher, j, d) for j, d in zip(jobs, delays))), 60)
        finally:
            batcher.close()

    assert asyncio.run(burst()) == list(range(151))
    assert sum(sizes) == sum(rows for _, rows in jobs)
    assert max(sizes) == 9 and sorted(sizes)[-2] <= 6  # only the 9-row job exceeds max_rows, alone


@pytest.mark.slow
def test_cli_serves_a_stage_on_loopback(tmp_path, popularity):
    """`recalign serve teacher STAGE --port P` in its own process answers /health and /inference."""
    import os
    import subprocess
    import sys
    import time

    from recalign.serve.app import free_port

    stage = tmp_path / "stages" / "pop"
    popularity.teacher.save(stage / "model")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    server = subprocess.Popen([sys.executable, "-m", "recalign.cli", "serve", "teacher", str(stage), "--port",
                               str(port), "--no-batching"], env={**env, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the server exited"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "no /health answer within 120 s"
                time.sleep(0.2)
        assert health.json()["teacher"] == "popularity" and health.json()["batching"] is False
        answer = httpx.post(f"http://127.0.0.1:{port}/inference", json={"item_lists": [[0], [2]], "k": 2})
        assert answer.json() == {"inference": [[2, 1], [0, 1]]}
    finally:
        server.terminate()
        server.wait(30)
