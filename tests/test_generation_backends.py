"""Generation backends from the recipe (`recalign.llm.backends`): an llm-sft stage evaluated over a real
`recalign serve llm` on 127.0.0.1 (backend openai) gives the answers and metrics of in-process transformers; the
recipe's backend errors are one-line ConfigErrors; vllm not importable is a one-line error; `serve llm` with
backend openai forwards its completions and answers /v1/recommend grounded."""

from __future__ import annotations

import json
import sys

import httpx
import pandas as pd
import pytest
import torch

from recalign.data.dataset import build_dataset
from recalign.errors import ConfigError
from recalign.llm.backends import GenerationBackend, backend_from_options, generate_answers
from recalign.serve.app import serving_in_thread

from conftest import TINY_INTERACTIONS, TINY_ITEMS

torch.set_num_threads(1)

TITLES = ["Alpha Road", "Beta Lake", "Gamma Hill", "Delta Wood", "Echo Bay", "Foxtrot Peak"]
PARAMS = {"model": "tiny", "train_rows": 2, "batch_size": 2, "task": {"max_history": 3},
          "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "sft": {"max_steps": 1, "batch_size": 2, "max_length": 160},
          "generation": {"max_new_tokens": 6}, "grounding": {"kind": "fuzzy"}}


def toy_data(folder) -> str:
    """Six titled items in categories A/B/C, 6 users x 4 interactions; saved, returns the folder."""
    frame = pd.DataFrame([(f"u{u}", f"i{(u + t) % 6}", t) for u in range(6) for t in range(4)],
                         columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"item": [f"i{i}" for i in range(6)], "title": TITLES,
                          "categories": [["A"], ["A"], ["B"], ["B"], ["A", "B"], ["C"]]})
    build_dataset(frame, items=items, name="toy", source="test").save(folder)
    return str(folder)


def recipe(data: str, **params):
    from recalign.recipes import recipe_from_dict

    return recipe_from_dict({"name": "toyllm", "seed": 1, "data": {"path": data}, "eval": {"ks": [1, 3], "users": 4},
                             "stages": [{"name": "sft", "kind": "llm-sft", "params": {**PARAMS, **params}}]})


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def answers_of(run_dir) -> list[dict]:
    lines = (run_dir / "stages" / "sft" / "answers.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# ---- (a) the same stage, evaluated in-process and over a real server ------------------------------------------

def test_llm_sft_stage_over_openai_server_equals_transformers(tmp_path):
    from recalign.runs import run_recipe
    from recalign.serve.llm import llm_app_from_stage

    data = toy_data(tmp_path / "data")
    local = run_recipe(recipe(data), tmp_path / "local", progress=False)["stages"]["sft"]
    with serving_in_thread(llm_app_from_stage(tmp_path / "local" / "stages" / "sft")) as url:
        # The same recipe and seed train the same adapter; only its evaluation goes to the served copy.
        served = run_recipe(recipe(data, backend={"backend": "openai", "base_url": url}), tmp_path / "served",
                            progress=False)["stages"]["sft"]
        calls = httpx.get(f"{url}/health").json()["batched_requests"]
    assert calls >= 2  # 4 users, batch_size 2: the answers really came over HTTP
    assert answers_of(tmp_path / "served") == answers_of(tmp_path / "local")
    assert len(answers_of(tmp_path / "local")) == 4 and any(r["answer_greedy"] for r in answers_of(tmp_path / "local"))
    assert without_timing(served) == without_timing(local)
    assert {"hr@1", "ndcg@3", "valid_title_rate"} <= set(local)


def test_generate_answers_openai_equals_transformers_greedy():
    from recalign.llm.generate import GenerationConfig
    from recalign.llm.models import tiny_model
    from recalign.llm.tasks import SeqRecTask
    from recalign.serve.llm import llm_app

    model, tokenizer = tiny_model(seed=3)
    dataset = build_dataset(TINY_INTERACTIONS, items=TINY_ITEMS, name="tiny", source="test")
    prompts = ["Hello there", "A much longer prompt about red oceans and gardens", "x"]
    settings = GenerationConfig(max_new_tokens=5)
    local = generate_answers(None, model, tokenizer, prompts, settings, batch_size=2)
    with serving_in_thread(llm_app(model, tokenizer, dataset, SeqRecTask(), name="m")) as url:
        remote = generate_answers(GenerationBackend(backend="openai", base_url=url + "/v1"), None, tokenizer,
                                  prompts, settings, batch_size=2)
    assert remote == local and len(local) == 3 and all(len(a) == 1 for a in local)


# ---- (b) recipe validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, message", [
    ({"backend": "tgi"}, "stages.sft.params.backend.backend"),
    ({"backend": "openai"}, "backend openai needs base_url"),
    ({"backend": "openai", "base_url": "127.0.0.1:8000"}, "base_url must be http(s)://host:port"),
    ({"backend": "openai", "base_url": "http://h:1", "api_key_env": "sk-abc123"}, "NAME of an environment variable"),
    ({"backend": "transformers", "base_url": "http://h:1"}, "are for backend openai, not transformers"),
    ({"backend": "openai", "base_url": "http://h:1", "llm_options": {"x": 1}}, "llm_options are for backend vllm"),
    ({"backend": "openai", "base_url": "http://h:1", "temperature": 0}, "unknown key"),
])
def test_bad_backend_blocks_are_one_line_config_errors(tmp_path, backend, message):
    with pytest.raises(ConfigError) as caught:
        recipe(str(tmp_path / "data"), backend=backend)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("kind, params", [("sprec", {}), ("trackrec", {}),
                                          ("controllable", {"teacher": "http://127.0.0.1:12621"})])
def test_every_llm_stage_kind_takes_the_backend_block(tmp_path, kind, params):
    from recalign.recipes import recipe_from_dict

    def load(backend):
        return recipe_from_dict({"name": "r", "seed": 1, "data": {"path": str(tmp_path)},
                                 "stages": [{"name": "s", "kind": kind, "params": {**params, "backend": backend}}]})

    good = load({"backend": "openai", "base_url": "http://127.0.0.1:9"})
    assert good.stages[0].params["backend"]["base_url"] == "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match=r"stages\.s\.params\.backend.*base_url"):
        load({"backend": "openai"})


def test_constrained_decoding_with_openai_fails_before_training(tmp_path):
    from recalign.runs import run_recipe

    bad = recipe(toy_data(tmp_path / "data"), decodings=["greedy", "constrained"],
                 backend={"backend": "openai", "base_url": "http://127.0.0.1:9"})
    with pytest.raises(ConfigError, match="constrained \\(trie\\) decoding needs backend transformers, not openai"):
        run_recipe(bad, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "stages" / "sft" / "model").exists()


def test_missing_api_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("RECALIGN_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="RECALIGN_TEST_KEY, which is not set"):
        backend_from_options("openai", base_url="http://127.0.0.1:9", api_key_env="RECALIGN_TEST_KEY")


# ---- (c) vllm not importable ----------------------------------------------------------------------------------

def test_vllm_not_importable_is_one_line_error(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from recalign.cli import app

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, find_spec says None
    with pytest.raises(ConfigError, match="backend vllm, but vllm is not installed"):
        generate_answers(GenerationBackend(backend="vllm"), "some/model", None, ["hi"])
    from recalign.serve.llm import serve_llm

    with pytest.raises(ConfigError, match="^serve llm: backend vllm, but vllm is not installed"):
        serve_llm(tmp_path / "no-stage", backend="vllm")  # refused before any folder or model is read
    with pytest.raises(ConfigError, match="^serve llm: backend openai needs base_url"):
        serve_llm(tmp_path / "no-stage", backend="openai")
    data = toy_data(tmp_path / "data")
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"name": "toyllm", "seed": 1, "data": {"path": data}, "eval": {"ks": [1]},
                                "stages": [{"name": "sft", "kind": "llm-sft",
                                            "params": {**PARAMS, "backend": {"backend": "vllm"}}}]}))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    errors = [line for line in result.output.splitlines() if line.startswith("recalign: error:")]
    assert result.exit_code == 2, result.output
    assert errors == [result.output.strip().splitlines()[-1]]  # the last line, and the only error line
    assert errors[0].startswith("recalign: error: llm-sft backend: backend vllm, but vllm is not installed")
    assert not (tmp_path / "run").exists()  # checked before the stage trained: nothing half-written


def test_auto_falls_back_to_transformers_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert GenerationBackend(backend="auto").resolved() == "transformers"
    assert GenerationBackend().resolved() == "transformers"


# ---- serve llm with backend openai ------------------------------------------------------------------------------

def test_serve_llm_backend_openai_forwards_and_grounds(tmp_path):
    from recalign.llm.models import tiny_model
    from recalign.llm.tasks import SeqRecTask
    from recalign.serve.llm import llm_app

    model, tokenizer = tiny_model(seed=0)
    dataset = build_dataset(TINY_INTERACTIONS, items=TINY_ITEMS, name="tiny", source="test")
    task = SeqRecTask(max_history=5)
    body = {"model": "front", "prompt": ["Red Ocean", "Golden"], "max_tokens": 4}
    with serving_in_thread(llm_app(model, tokenizer, dataset, task, name="back")) as back_url:
        front = llm_app(model, tokenizer, dataset, task, name="front",
                        backend=GenerationBackend(backend="openai", base_url=back_url))
        with serving_in_thread(front) as front_url:
            forwarded = httpx.post(f"{front_url}/v1/completions", json=body, timeout=60).json()
            recommended = httpx.post(f"{front_url}/v1/recommend", timeout=60,
                                     json={"history": [0], "k": 5, "control": "-Mystery"})
            direct = httpx.post(f"{back_url}/v1/completions", json={**body, "model": "back"}, timeout=60).json()
            back_calls = httpx.get(f"{back_url}/health").json()["batched_requests"]
    assert [c["text"] for c in forwarded["choices"]] == [c["text"] for c in direct["choices"]]
    assert back_calls >= 3  # the front's completion and grounded answer both went to the back server
    assert recommended.status_code == 200, recommended.text
    items = recommended.json()["items"]
    # -Mystery leaves Golden Empire 3 (2) and Broken Mirror 5 (4); grounded scores are fuzzy similarities 0..1
    assert sorted(i["id"] for i in items) == [2, 4]
    assert all(0.0 <= i["score"] <= 1.0 for i in items)


# ---- vllm with a LoRA model: a merged copy in a temp folder (a stand-in vllm module, vLLM is not installed here) --

class StandInLLM:
    """`vllm.LLM` stand-in: loads the folder with transformers and answers greedily; records what it was given."""

    built: list[tuple[str, bool, dict]] = []

    def __init__(self, model: str, seed: int = 0, **options):
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        StandInLLM.built.append((model, (Path(model) / "adapter_config.json").exists(), options))
        self.model = AutoModelForCausalLM.from_pretrained(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def generate(self, prompts, params):
        from types import SimpleNamespace

        from recalign.llm.generate import GenerationConfig, generate

        assert params.temperature == 0.0  # greedy, as the backend asks for it
        answers = generate(self.model, self.tokenizer, prompts, GenerationConfig(max_new_tokens=params.max_tokens))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=a[0])]) for a in answers]


def test_vllm_backend_gets_a_merged_lora_copy_and_removes_it(tmp_path, monkeypatch):
    import importlib.machinery
    import types

    from recalign.llm.generate import GenerationConfig
    from recalign.llm.models import load_model
    from recalign.llm.trainer import LoraConfig

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = StandInLLM, lambda **fields: types.SimpleNamespace(**fields)
    monkeypatch.setitem(sys.modules, "vllm", module)
    StandInLLM.built.clear()
    model, tokenizer = load_model("tiny", device="cpu", lora=LoraConfig(r=2, alpha=4, dropout=0.0), seed=0,
                                  progress=False)
    with torch.no_grad():  # a non-zero adapter: merging must matter
        generator = torch.Generator().manual_seed(0)
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator))
    prompts = ["Red Ocean", "Golden Empire and more", "x"]
    settings = GenerationConfig(max_new_tokens=5)
    local = generate_answers(None, model, tokenizer, prompts, settings)
    with model.disable_adapter():
        base = generate_answers(None, model, tokenizer, prompts, settings)
    served = generate_answers(GenerationBackend(backend="vllm", llm_options={"gpu_memory_utilization": 0.5}),
                              model, tokenizer, prompts, settings, scratch=tmp_path / "scratch")
    assert served == local and local != base  # the adapter's answers, not the base model's
    [(folder, has_adapter, options)] = StandInLLM.built
    assert folder.startswith(str(tmp_path / "scratch")) and not has_adapter  # full merged weights
    assert options == {"gpu_memory_utilization": 0.5}
    assert not (tmp_path / "scratch").exists()  # the merged copy and its scratch folder are gone
