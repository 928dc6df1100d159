"""Batched generation: batching/padding invariance, seeded sampling, beams, logits processors (trie-constrained
decoding), and the OpenAI-compatible HTTP backend against a fake server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from pydantic import ValidationError

pytest.importorskip("transformers")

from recalign.errors import ConfigError, RecalignError  # noqa: E402
from recalign.llm.generate import GenerationConfig, TrieConstraint, completions_url, generate  # noqa: E402
from recalign.llm.models import tiny_model  # noqa: E402
from recalign.llm.tasks import parse_title  # noqa: E402

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

PROMPTS = ["Dune ->", "A much longer prompt about Emma and Ulysses ->", "x", "Beloved, Hamlet and Walden ->"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def _direct_greedy(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_greedy_answers_do_not_depend_on_batching_or_padding(tiny):
    model, tokenizer = tiny
    settings = GenerationConfig(max_new_tokens=6)
    one = generate(model, tokenizer, PROMPTS, settings, batch_size=1)
    all_at_once = generate(model, tokenizer, PROMPTS, settings, batch_size=4)
    pairs = generate(model, tokenizer, PROMPTS, settings, batch_size=3)
    assert one == all_at_once == pairs
    assert [a[0] for a in one] == [_direct_greedy(model, tokenizer, p, 6) for p in PROMPTS]  # input order kept
    assert tokenizer.padding_side == "right"  # restored


def test_sampling_is_seeded_and_leaves_the_global_generator_alone(tiny):
    model, tokenizer = tiny
    torch.manual_seed(5)
    expected_next = torch.rand(2)
    torch.manual_seed(5)
    a = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=5, do_sample=True, seed=1,
                                                               num_return_sequences=2), batch_size=2)
    assert torch.equal(torch.rand(2), expected_next)
    b = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=5, do_sample=True, seed=1,
                                                               num_return_sequences=2), batch_size=2)
    c = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=5, do_sample=True, seed=2,
                                                               num_return_sequences=2), batch_size=2)
    assert a == b and a != c
    assert all(len(answers) == 2 for answers in a)


def test_beam_search_returns_distinct_answers_per_prompt(tiny):
    model, tokenizer = tiny
    out = generate(model, tokenizer, PROMPTS[:2], GenerationConfig(max_new_tokens=4, num_beams=3,
                                                                     num_return_sequences=3), batch_size=2)
    assert [len(a) for a in out] == [3, 3]
    assert all(len(set(a)) == 3 for a in out)
    with pytest.raises(ValidationError, match="num_return_sequences"):
        GenerationConfig(num_return_sequences=2)


def test_trie_constraint_makes_every_answer_a_catalog_title(tiny):
    from recalign.llm.constrained import CatalogTrie

    model, tokenizer = tiny
    catalog = ["Dune", "Emma", "Ulysses", "The Left Hand of Darkness", "Walden"]
    trie = CatalogTrie.from_titles(catalog, tokenizer, prefix='"', suffix='"')
    free = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=16), batch_size=3)
    assert not any(parse_title(a[0]) in catalog for a in free)  # a random model never names one by itself
    constrained = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=16), batch_size=3,
                           logits_processor=TrieConstraint(trie))
    for (answer,) in constrained:
        assert answer.startswith('"') and answer.endswith('"') and parse_title(answer) in catalog


def test_plain_logits_processor_is_applied(tiny):
    model, tokenizer = tiny
    only = tokenizer.encode("!", add_special_tokens=False)[0]

    def force(input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        masked[:, only] = 0.0
        return masked

    out = generate(model, tokenizer, PROMPTS[:2], GenerationConfig(max_new_tokens=3), logits_processor=force)
    assert out == [["!!!"], ["!!!"]]


def test_empty_prompt_list_and_bad_backend(tiny):
    model, tokenizer = tiny
    assert generate(model, tokenizer, [], GenerationConfig()) == []
    with pytest.raises(ConfigError, match="backend"):
        generate(model, tokenizer, PROMPTS, backend="nope")


# ---- OpenAI-compatible server ----------------------------------------------------------------------------------

class _FakeCompletions(BaseHTTPRequestHandler):
    """POST /v1/completions: answers 'prompt|j' per prompt and sample j, choices in reverse order (index says where)."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.path != "/v1/completions" or body.get("model") != "served-model":
            self._reply(404, {"error": {"message": f"no such model or path {self.path}"}})
            return
        n = body["n"]
        choices = [{"index": i * n + j, "text": f"{p}|{j}"} for i, p in enumerate(body["prompt"]) for j in range(n)]
        self._reply(200, {"object": "text_completion", "choices": choices[::-1]})

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture()
def server():
    _FakeCompletions.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_openai_backend_batches_prompts_and_groups_choices(server):
    prompts = [f"p{i}" for i in range(5)]
    settings = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.7, num_return_sequences=2)
    out = generate("served-model", None, prompts, settings, batch_size=2, backend="openai", base_url=server,
                   api_key="k")
    assert out == [[f"p{i}|0", f"p{i}|1"] for i in range(5)]
    requests = _FakeCompletions.requests
    assert [r["body"]["prompt"] for r in requests] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    first = requests[0]["body"]
    assert first["max_tokens"] == 7 and first["n"] == 2 and first["temperature"] == 0.7
    assert requests[0]["auth"] == "Bearer k"
    greedy = generate("served-model", None, ["a"], GenerationConfig(), backend="openai", base_url=server + "/v1")
    assert greedy == [["a|0"]] and _FakeCompletions.requests[-1]["body"]["temperature"] == 0.0


def test_openai_backend_errors_are_one_line_recalign_errors(server):
    with pytest.raises(RecalignError, match="HTTP 404"):
        generate("other-model", None, ["a"], backend="openai", base_url=server)
    with pytest.raises(ConfigError, match="base_url"):
        generate("served-model", None, ["a"], backend="openai")
    with pytest.raises(ConfigError, match="beam"):
        generate("served-model", None, ["a"], GenerationConfig(num_beams=2), backend="openai", base_url=server)
    with pytest.raises(ConfigError, match="logits processor"):
        generate("served-model", None, ["a"], backend="openai", base_url=server, logits_processor=lambda i, s: s)


def test_openai_backend_unreachable_server():
    with pytest.raises(RecalignError, match="generation server"):
        generate("m", None, ["a"], backend="openai", base_url="http://127.0.0.1:9", timeout=2.0)


def test_completions_url():
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"


def _teacher_forced_logprobs(model, tokenizer, prompt: str, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token_t | prompt, tokens_<t) from one forward pass over the unpadded prompt + tokens."""
    prompt_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    ids = torch.cat([prompt_ids, tokens])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, tokens[:, None]).squeeze(1)


@pytest.mark.parametrize("sampled", [False, True])
def test_token_logprobs_equal_a_teacher_forced_forward_pass(tiny, sampled):
    model, tokenizer = tiny
    settings = GenerationConfig(max_new_tokens=5, do_sample=sampled, temperature=0.7 if sampled else 1.0,
                                  num_return_sequences=2 if sampled else 1, seed=3)
    details = generate(model, tokenizer, PROMPTS, settings, batch_size=3, return_details=True)  # left-padded batches
    texts = generate(model, tokenizer, PROMPTS, settings, batch_size=3)
    assert [[d.text for d in row] for row in details] == texts  # the same answers as the plain call
    for prompt, row in zip(PROMPTS, details):
        assert len(row) == settings.num_return_sequences
        for answer in row:
            assert answer.token_ids.dtype == torch.long and answer.token_ids.shape == answer.logprobs.shape
            assert 1 <= len(answer.token_ids) <= 5 and (answer.logprobs <= 0).all()
            assert tokenizer.decode(answer.token_ids, skip_special_tokens=True) == answer.text
            expected = _teacher_forced_logprobs(model, tokenizer, prompt, answer.token_ids, settings.temperature)
            assert torch.allclose(answer.logprobs, expected, atol=1e-4)
            assert answer.logprob == pytest.approx(float(expected.sum()), abs=1e-3)
    if not sampled:  # greedy picks the argmax, so every token's log-prob is the step's maximum
        answer = details[0][0]
        prompt_ids = tokenizer(PROMPTS[0], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt_ids, answer.token_ids])[None]).logits[0]
        best = torch.log_softmax(logits[len(prompt_ids) - 1:-1], -1).max(-1).values
        assert torch.allclose(answer.logprobs, best, atol=1e-4)


def test_token_details_stop_after_eos_and_refuse_beams(tiny):
    from recalign.llm.generate import _details

    eos = torch.tensor([7])
    sequences = torch.tensor([[3, 7, 7], [4, 5, 6]])
    logits = [torch.zeros(2, 10), torch.zeros(2, 10), torch.zeros(2, 10)]  # uniform: every log-prob is -ln 10
    out = _details(sequences, logits, ["a", "b"], 1.0, eos)
    assert out[0].token_ids.tolist() == [3, 7] and out[1].token_ids.tolist() == [4, 5, 6]  # EOS kept, padding cut
    assert torch.allclose(out[0].logprobs, torch.full((2,), -torch.log(torch.tensor(10.0))))
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match="beam"):
        generate(model, tokenizer, PROMPTS, GenerationConfig(num_beams=2), return_details=True)
