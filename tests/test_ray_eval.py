"""eval.backend ray (issue 14, acceptance 4): Ray workers answer shards of the test users, the driver scores them with
the same list evaluator, and the metrics and answers equal the in-process evaluator's."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from recalign.recipes import recipe_from_dict
from recalign.errors import ConfigError
from recalign.eval.ray_backend import import_ray, shard_bounds

TITLES = ["Dune", "Emma", "Ulysses and the Long Sea Road", "Beloved", "Hamlet, Prince of Denmark", "Walden Pond",
          "Rebecca", "The Brothers Karamazov"]


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance for this module (2 CPUs, as eval.workers), shut down afterwards."""
    ray = pytest.importorskip("ray")
    from recalign.eval.ray_backend import connect

    started = not ray.is_initialized()
    connect(2)
    yield ray
    if started:
        ray.shutdown()


def _toy_data(folder) -> None:
    """10 users with 4-7 interactions over 8 items whose titles differ in length (prompts of different lengths)."""
    from recalign.data.dataset import build_dataset

    rng = np.random.default_rng(3)
    rows = [(f"u{u}", f"i{int(rng.integers(len(TITLES)))}", t) for u in range(10) for t in range(4 + u % 4)]
    items = pd.DataFrame({"item": [f"i{i}" for i in range(len(TITLES))], "title": TITLES})
    build_dataset(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), items=items, name="toy",
                  source="test").save(folder)


def _recipe(data, backend: str, **eval_fields):
    params = {"model": "tiny", "train_rows": 4, "batch_size": 2, "task": {"max_history": 3},
              "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "sft": {"max_steps": 2, "batch_size": 2, "max_length": 160},
              "generation": {"max_new_tokens": 6}, "decodings": ["greedy", "constrained"],
              "grounding": {"kind": "fuzzy"}}
    return recipe_from_dict({"name": "rayeval", "seed": 1, "data": {"path": str(data)},
                             "eval": {"ks": [1, 5], "users": 7, "backend": backend, **eval_fields},
                             "stages": [{"name": "sft", "kind": "llm-sft", "params": params}]})


# ---- shards ----------------------------------------------------------------------------------------------------

def test_shard_bounds_are_contiguous_and_cut_at_batch_boundaries():
    assert shard_bounds(6, 2, 2) == [(0, 4), (4, 6)]  # 3 batches: 2 + 1
    assert shard_bounds(7, 2, 2) == [(0, 4), (4, 7)]  # 4 batches (the last one short): 2 + 2
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(3, 4, 2) == [(0, 2), (2, 3)]  # fewer batches than workers: no empty shards
    assert shard_bounds(0, 2) == []
    with pytest.raises(ConfigError):
        shard_bounds(4, 0)


class EchoPool:
    """A stand-in for a 2-worker `WorkerPool`: answers a row with its user and history length; keeps the shards."""

    def __init__(self):
        self.shards: list = []

    def __len__(self) -> int:
        return 2

    def map(self, method: str, shards: list) -> list:
        self.shards = shards
        return [[f"u{user}:{len(history)}" for user, history in zip(users, histories)]
                for _, users, histories in shards]


def test_pooled_answers_cut_generation_batches_and_come_back_in_row_order():
    from recalign.llm.models import smollm2_tokenizer
    from recalign.llm.generate import GenerationConfig
    from recalign.methods.llm_sft.stage import PooledAnswerLists
    from recalign.llm.tasks import Rows, SeqRecTask

    # One title repeated: a longer history is a longer prompt. Generation batches longest first, ties in row
    # order: rows 4 (4 items), 1 (3), 3 (2), 0 (1), 2 (1); batch size 2 -> batches [4 1] [3 0] [2] -> 2 + 1 batches.
    histories = [[0], [0, 0, 0], [0], [0, 0], [0, 0, 0, 0]]
    rows = Rows(np.array([10, 11, 12, 13, 14]), histories, np.full(5, -1))
    pool = EchoPool()
    held = GenerationConfig(fast_batch_size=None)  # the fast path held to the stage's batch size
    lists = PooledAnswerLists(pool, smollm2_tokenizer(progress=False), SeqRecTask(max_history=5), TITLES, None,
                              batch_size=2, decoding="constrained", generation=held)
    assert lists.answers(rows) == ["u10:1", "u11:3", "u12:1", "u13:2", "u14:4"]
    assert [(decoding, users) for decoding, users, _ in pool.shards] == [("constrained", [14, 11, 13, 10]),
                                                                         ("constrained", [12])]
    assert lists.processor is None  # the trie lives on the workers, not on the driver
    pool = EchoPool()  # the default fast path batches 64 prompts: the five rows are one batch, one shard
    lists = PooledAnswerLists(pool, smollm2_tokenizer(progress=False), SeqRecTask(max_history=5), TITLES, None,
                              batch_size=2, decoding="constrained")
    assert lists.answers(rows) == ["u10:1", "u11:3", "u12:1", "u13:2", "u14:4"]
    assert [users for _, users, _ in pool.shards] == [[14, 11, 13, 10, 12]]


# ---- missing ray and bad settings: one-line ConfigErrors -------------------------------------------------------

def test_missing_ray_is_a_config_error_before_training(tmp_path, monkeypatch):
    from recalign.runs import run_recipe

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'recalign\[ray\]'"):
        import_ray()
    _toy_data(tmp_path / "data")
    with pytest.raises(ConfigError, match="eval.backend: ray needs the 'ray' package"):
        run_recipe(_recipe(tmp_path / "data", "ray"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "stages" / "sft" / "DONE").exists()
    assert not list((tmp_path / "run" / "stages").glob("*/model"))  # nothing trained, nothing half-written


def test_ray_that_does_not_start_is_retried_then_one_error_line(monkeypatch):
    import types

    from recalign.errors import RecalignError
    from recalign.eval.ray_backend import connect

    calls: list[dict] = []

    def init(**options):
        calls.append(options)
        raise Exception("The current node timed out during startup. This could happen ...\nmore")

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init, shutdown=lambda: None)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RecalignError, match=r"local Ray instance \(3 tries\): The current node timed out") as caught:
        connect(2)
    assert "\n" not in str(caught.value)
    assert [c["num_cpus"] for c in calls] == [2, 2, 2] and not calls[0]["include_dashboard"]
    calls.clear()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(RecalignError, match=r"cluster at RAY_ADDRESS=10.0.0.1:6379"):
        connect(2)
    assert calls == [{"address": "10.0.0.1:6379", "ignore_reinit_error": True, "log_to_driver": False}]


def test_eval_backend_and_workers_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.backend: .*'local' or 'ray'"):
        _recipe(tmp_path, "spark")
    with pytest.raises(ConfigError, match=r"eval\.workers: .*greater than or equal to 1"):
        _recipe(tmp_path, "ray", workers=0)
    assert _recipe(tmp_path, "local").eval.workers == 2


def test_backend_and_workers_do_not_change_stage_hashes(tmp_path):
    from recalign.runs import stage_hashes

    local = stage_hashes(_recipe(tmp_path, "local"), "fingerprint")
    assert stage_hashes(_recipe(tmp_path, "ray", workers=3), "fingerprint") == local  # a finished stage stays done
    assert stage_hashes(_recipe(tmp_path, "local", users=6), "fingerprint") != local


# ---- Ray workers -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_worker_pool_runs_one_shard_per_worker_in_order_on_one_thread(ray_session):
    from recalign.eval.ray_backend import WorkerPool

    with WorkerPool(str, ("abc",), workers=2) as pool:
        assert pool.map("__add__", [("x",), ("y",)]) == ["abcx", "abcy"]
        assert pool.threads() == [1, 1]
        with pytest.raises(ConfigError, match="3 shards for 2 Ray workers"):
            pool.map("upper", [(), (), ()])


@pytest.mark.slow
def test_ray_workers_give_the_in_process_metrics_and_answers(tmp_path, ray_session):
    pytest.importorskip("peft")
    from recalign.llm.models import load_model
    from recalign.methods.llm_sft.stage import evaluate_decodings
    from recalign.methods.llm_sft.config import LLMSFTConfig
    from recalign.stages import RunContext
    from recalign.runs import open_run, run_recipe

    _toy_data(tmp_path / "data")
    ray = run_recipe(_recipe(tmp_path / "data", "ray", workers=2), tmp_path / "run", progress=False)["stages"]["sft"]
    stage_dir = tmp_path / "run" / "stages" / "sft"
    saved = [json.loads(line) for line in (stage_dir / "answers.jsonl").read_text().splitlines()]
    # In-process: the same saved adapter, the same users, the recipe's evaluator, eval.backend local.
    recipe, dataset, split = open_run(tmp_path / "run")
    recipe.eval.backend = "local"
    params = LLMSFTConfig(**recipe.stages[0].params)
    model, tokenizer = load_model("tiny", seed=recipe.seed, adapter=stage_dir / "model", progress=False)
    ctx = RunContext(run_dir=tmp_path / "run", stage_dir=stage_dir, dataset=dataset, split=split, seed=recipe.seed,
                     progress=False, recipe=recipe, stage=recipe.stages[0])
    local, records = evaluate_decodings(ctx, model, tokenizer, params, "test")
    assert {k: ray[k] for k in local if not k.endswith("_seconds")} \
        == {k: v for k, v in local.items() if not k.endswith("_seconds")}  # every metric; timings aside
    assert local["n_users"] == 7 and {"constrained.hr@5", "constrained.valid_title_rate"} <= set(local)
    assert [{k: v for k, v in r.items() if k != "target_title"} for r in saved] == records  # users, order, answers
    assert not (stage_dir / "scratch").exists()
