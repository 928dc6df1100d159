"""Schemathesis against both servers' OpenAPI schemas, in process (ASGI), with the bearer token on: no 5xx, only
documented status codes and content types, and every answer fits its documented schema (errors: {"error": ...};
/inference, /ranking and /v1/recommend: their answer models).

Each operation gets a small derandomized budget of positive cases (bodies that fit the schema) and, where it has a
body, negative ones (bodies that do not). Random bodies rarely name the served model, a user or a catalog item, so
half of the positive cases are steered onto them (`steer`): some of those reach the model and are answered 200.
"""

from __future__ import annotations

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from recalign.data.dataset import build_dataset
from recalign.llm.tasks import SeqRecTask
from recalign.serve.llm import llm_app
from recalign.serve.teacher import create_teacher_app
from recalign.teachers.popularity import Popularity
from recalign.teachers.service import TeacherService

from conftest import TINY_INTERACTIONS, TINY_ITEMS

TOKEN = "fuzz-token"
NAME = "tiny-llm"
N_ITEMS = len(TINY_ITEMS)
N_USERS = 3
EXAMPLES = 15  # per operation and generation mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE

TEACHER_OPERATIONS = [("POST", "/inference"), ("POST", "/ranking"), ("GET", "/health")]
LLM_OPERATIONS = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                  ("POST", "/v1/recommend"), ("GET", "/health")]
HAS_BODY = {"/inference", "/ranking", "/v1/chat/completions", "/v1/completions", "/v1/recommend"}


def _dataset():
    return build_dataset(TINY_INTERACTIONS, items=TINY_ITEMS, name="tiny", source="test")


@pytest.fixture(scope="module")
def teacher_schema():
    dataset = _dataset()
    service = TeacherService(Popularity().fit(dataset, dataset.interactions, progress=False))
    return schemathesis.openapi.from_asgi("/openapi.json", create_teacher_app(service, token=TOKEN))


@pytest.fixture(scope="module")
def llm_schema():
    from recalign.llm.models import tiny_model

    model, tokenizer = tiny_model(seed=0)
    app = llm_app(model, tokenizer, _dataset(), SeqRecTask(max_history=5), name=NAME, token=TOKEN, max_wait_ms=0)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _known(value, n: int = N_ITEMS):
    """A whole number folded onto 0..n-1 (lists: each entry); anything else unchanged.

    JSON Schema's "integer" includes 3.0, which the servers' strict ints refuse (422): steered ids are true ints.
    """
    if isinstance(value, list):
        return [_known(v, n) for v in value]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value % n if isinstance(value, int) and not isinstance(value, bool) else value


def steer(case):
    """The case with the served model's name, known item and user ids and at most 4 new tokens."""
    body = case.body
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = NAME
        if isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = min(body["max_tokens"], 4)
        for key in ("history", "candidates", "item_lists", "candidate_item_lists"):
            if isinstance(body.get(key), list):
                body[key] = _known(body[key])
        if isinstance(body.get("users"), list):
            body["users"] = _known(body["users"], N_USERS)
        rows = body.get("item_lists")
        if isinstance(rows, list) and rows:  # the teacher's per-row lists must have one entry per history
            if isinstance(body.get("item_lengths"), list):
                body["item_lengths"] = [len(row) if isinstance(row, list) else 0 for row in rows]
            for key, filler in (("users", 0), ("candidate_item_lists", [0]), ("target_category", None)):
                if isinstance(body.get(key), list):
                    body[key] = ((body[key] or [filler]) * len(rows))[:len(rows)]
    return case


def fuzz(schema, method: str, path: str, mode: GenerationMode, steered: bool = False) -> collections.Counter:
    """Run EXAMPLES derandomized cases of one operation through the checks; the status codes seen."""
    statuses: collections.Counter = collections.Counter()
    strategy = schema[path][method].as_strategy(generation_mode=mode)
    if steered:
        strategy = st.one_of(strategy, strategy.map(steer))

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
        statuses[response.status_code] += 1

    run()
    print(f"{method} {path} {mode.value}: {sum(statuses.values())} cases, statuses {dict(statuses)}")
    return statuses


def _cases(operations: list[tuple[str, str]]) -> list:
    return [pytest.param(method, path, mode, id=f"{method} {path} {mode.value}") for method, path in operations
            for mode in (POSITIVE, NEGATIVE) if mode is POSITIVE or path in HAS_BODY]


def test_the_schemas_list_exactly_the_fuzzed_operations(teacher_schema, llm_schema):
    for schema, operations in ((teacher_schema, TEACHER_OPERATIONS), (llm_schema, LLM_OPERATIONS)):
        listed = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
        assert listed == set(operations)


def test_every_operation_documents_json_errors(teacher_schema, llm_schema):
    for schema in (teacher_schema, llm_schema):
        for path, methods in schema.raw_schema["paths"].items():
            for method, operation in methods.items():
                for status in ("401", "403", "413", "422"):
                    content = operation["responses"][status]["content"]["application/json"]["schema"]
                    assert content == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
        assert schema.raw_schema["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    for schema, path, answer in ((teacher_schema, "/inference", "InferenceAnswer"),
                                 (teacher_schema, "/ranking", "RankingAnswer"),
                                 (llm_schema, "/v1/recommend", "RecommendAnswer")):
        ok = schema.raw_schema["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{answer}"}


@pytest.mark.parametrize("method, path, mode", _cases(TEACHER_OPERATIONS))
def test_teacher_fuzz_finds_no_server_error(teacher_schema, method, path, mode):
    statuses = fuzz(teacher_schema, method, path, mode, steered=mode is POSITIVE)
    assert max(statuses) < 500
    if path in HAS_BODY:
        assert sum(statuses.values()) >= EXAMPLES - 2, statuses  # the budget was spent, not skipped
    if mode is POSITIVE:
        assert statuses[200] >= 1, statuses  # the steered half reached the teacher
    if mode is NEGATIVE:
        assert max(statuses) < 300 or min(statuses) >= 400, statuses  # bodies off the schema are refused


@pytest.mark.parametrize("method, path, mode", _cases(LLM_OPERATIONS))
def test_llm_fuzz_finds_no_server_error(llm_schema, method, path, mode):
    statuses = fuzz(llm_schema, method, path, mode, steered=mode is POSITIVE)
    assert max(statuses) < 500
    if path in HAS_BODY:
        assert sum(statuses.values()) >= EXAMPLES - 2, statuses
    if mode is POSITIVE and path in {"/v1/completions", "/v1/chat/completions", "/v1/recommend"}:
        assert statuses[200] >= 1, statuses  # the steered half reached the model
