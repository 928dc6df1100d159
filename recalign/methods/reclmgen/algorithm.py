"""RecLM-gen (Lu et al., 2024; systems.md §5): controllable recommendation by SFT on a task mix, then RL from a teacher.

The algorithm, as `run_controllable` runs it (tasks: `recalign.methods.reclmgen.tasks`, rewards:
`recalign.methods.reclmgen.rewards`, metrics: `recalign.methods.reclmgen.metrics`):

    T  ← the teacher: a recipe teacher stage (in process) or `http://host:port` (the §1.3 HTTP API)
    θ  ← base model + LoRA (r 16, α 8)                                   or an earlier stage's SFT model (init_from)
    for epoch e = 1 .. E:                                                SFT, one checkpoint per epoch
        D_e ← the §5.3 mix regenerated from (seed, e): SeqRec, ±C PersonalControlRec, PersonalCategoryRate
              LP/MP/EP, ControlRec (+ its reverse category question); labels from T
        θ   ← SFT(θ, D_e)
    π  ← merged θ
    algorithm ppo:  N PPO iterations (ours, `recalign.methods.reclmgen.ppo`: actor and critic LoRA, trained value head, KL to π)
    algorithm grpo: N GRPO iterations (TRL, `recalign.methods.reclmgen.grpo`), each over a seeded draw of prompts
        prompts: the §5.4 RL tasks (SeqRec, ±C, LP, MP, EP, k ~ U{6..10}) of `rl_episodes` episodes
        reward:  §5.5 item and list rewards from T's ranks; fine_grained = item rewards on each title's last token
                 plus the list reward on the last token, list = the list reward alone
    algorithm none: π is the SFT model (the baseline row)
    for task in §5.6 (SeqRec first; -C and LP read the model's own SeqRec answer):
        rows ← the recipe's evaluation users (history = last 10 items, target = the test item), the task's request
        answers ← greedy(π, rows); titles parsed, grounded by exact match then Levenshtein <= 3
        metrics ← recall, mrr, ndcg, non_exist, repeat, in_history, correct_count, target_category_rate,
                  sr_target_category_rate, category_rate_correct, not_in_candidate (every row counts)

Everything is resumable through one `IterationStore` under `work_dir`: each SFT epoch (sft/iter_e), each RL
iteration (ppo/iter_i or grpo/iter_i) and each test task's answers (test/<rl>_<n>/<task>.json) are written
atomically, so a killed run continues where it stopped. The recipe stage, the list-evaluator row of the SeqRec
answers and the teacher baselines are in `recalign.methods.reclmgen.stage`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from recalign.checkpoints import IterationStore, stable_hash
from recalign.errors import ConfigError
from recalign.eval.lists import NO_ENTRY
from recalign.io import write_atomic
from recalign.llm.backends import GenerationBackend
from recalign.llm.grounding import GroundingConfig
from recalign.llm.tasks import Rows, eval_rows, prompts_for, sample_rows
from recalign.llm.train import SFTConfig
from recalign.llm.trainer import LoraConfig
from recalign.methods.reclmgen.grpo import GRPOConfig
from recalign.methods.reclmgen.metrics import CategoryTable, score_control
from recalign.methods.reclmgen.ppo import PPOConfig
from recalign.methods.reclmgen.rewards import ALPHA, make_reward_fn
from recalign.methods.reclmgen.tasks import (
    SFT_TASKS,
    TEST_TASKS,
    ControlSource,
    ControlTask,
    build_test_rows,
    concat_rows,
    metric_inputs,
    parse_test_task,
    rl_rows,
    sft_rows,
)
from recalign.stages import fill_seeds

__all__ = ["RecLMGenConfig", "TaskAnswers", "run_controllable", "score_answers", "test_rows_of",
           "answer_records", "ANSWERS_DIR"]

ANSWERS_DIR = "test"
# may change between attempts on one work folder (test-time fields never change a checkpoint)
RESUMABLE_FIELDS = {"rl_iterations", "test_tasks", "batch_size", "backend"}


# ---- configuration ------------------------------------------------------------------------------------

class RecLMGenConfig(BaseModel):
    """Everything one RecLM-gen run depends on; defaults are CPU-sized (the paper's values in the descriptions)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="base model: HF id, local folder, .gguf, 'smollm2' or 'tiny' "
                                                "(null: the init_from stage's model, else 'smollm2')")
    teacher: str = Field(description="the teacher: a recipe teacher stage name, a teacher stage folder, or "
                                     "http(s)://host:port of `recalign serve teacher`")
    init_from: str | None = Field(None, description="an earlier controllable stage whose SFT model this stage "
                                                    "starts from (its own SFT is skipped)")
    max_history: int = Field(10, ge=1, description="most recent history items in a prompt (§5: 10)")
    # SFT (§5.3)
    sft_epochs: int = Field(1, ge=1, description="SFT epochs, the task mix regenerated each epoch (paper: 40)")
    sft_rows: int | None = Field(256, ge=1, description="rows sampled from each epoch's mix (null = all rows)")
    sft_tasks: list[str] = Field(default_factory=lambda: list(SFT_TASKS),
                                 description=f"SFT task families, some of {list(SFT_TASKS)}")
    control_re_items: int | None = Field(200, ge=1, description="items drawn for ControlRec per epoch (null = all)")
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=1.0, learning_rate=1e-3, batch_size=4,
                                                                 grad_accum=1, max_length=512),
                             description="one SFT pass per epoch (paper: lr 1e-3, batch 16 x 4 GPUs)")
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(r=16, alpha=8, dropout=0.05),
                               description="the SFT adapter (paper: r 16, α 8 on every linear layer)")
    # RL (§5.4, §5.5)
    algorithm: Literal["ppo", "grpo", "none"] = Field("ppo", description="RL after SFT: ppo | grpo | none")
    reward: Literal["fine_grained", "list"] = Field(
        "fine_grained", description="fine_grained: item rewards on each item's last token + list reward last; "
                                    "list: the list reward alone on the last token")
    alpha: float = Field(ALPHA, ge=0.0, le=1.0, description="weight of the rank score vs the task score (§5.5: 0.5)")
    rl_iterations: int = Field(4, ge=1, description="RL iterations (each saved; paper: thousands of batches)")
    rl_episodes: int = Field(1, ge=1, description="episodes of RL rows (each task once per user per episode)")
    rl_rows: int | None = Field(256, ge=1, description="RL rows sampled from the episodes (null = all)")
    prompts_per_iteration: int = Field(8, ge=1, description="prompts drawn per RL iteration (PPO and GRPO)")
    ppo: PPOConfig = Field(default_factory=lambda: PPOConfig(max_new_tokens=128, mini_batch_size=4,
                                                                 learning_rate=1e-5, generation_batch_size=8),
                             description="PPO settings (§5.4: kl 0.3, γ 0.99, λ 1, clip 0.2, 4 epochs, KL stop 0.05)")
    grpo: GRPOConfig = Field(default_factory=lambda: GRPOConfig(max_new_tokens=128, batch_size=4,
                                                                    num_generations=4, learning_rate=1e-5),
                               description="GRPO settings (TRL), same reward summed over tokens")
    # test (§5.6)
    test_tasks: list[str] = Field(default_factory=lambda: list(TEST_TASKS),
                                  description=f"test tasks, some of {list(TEST_TASKS)} (or lp_P / mp_P / ep_P)")
    max_new_tokens: int = Field(160, ge=8, description="tokens per 10-item test answer (scaled by k / 10; "
                                                       "~14 per MovieLens title)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call at test time")
    backend: GenerationBackend = Field(default_factory=GenerationBackend,
                                       description="engine of the test answers: transformers | vllm | openai | auto "
                                                   "(recalign.llm.backends); SFT, PPO and GRPO sampling always use "
                                                   "transformers")
    grounding: GroundingConfig = Field(default_factory=lambda: GroundingConfig(kind="fuzzy", threshold=3),
                                       description="test-time grounding (§5.6: exact, then Levenshtein <= 3)")
    n_negatives: int = Field(100, ge=1, description="SeqRanking: random negatives beside the target")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda'")
    seed: int | None = Field(None, description="seed of rows, adapters, sampling (default: the recipe seed)")

    @field_validator("sft_tasks")
    @classmethod
    def _known_sft_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in SFT_TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown or no SFT tasks {unknown}; expected some of {list(SFT_TASKS)}")
        return tasks

    @field_validator("test_tasks")
    @classmethod
    def _known_test_tasks(cls, tasks: list[str]) -> list[str]:
        for task in tasks:
            try:
                parse_test_task(task)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError("name each test task once, at least one")
        return tasks


# ---- per-task answers (what is saved, and what the metrics read) ------------------------------------------------

class TaskAnswers(BaseModel):
    """One test task's rows and answers: the request of each row, the raw answer and its grounded titles."""

    task: str
    users: list[int]
    targets: list[int]
    histories: list[list[int]]
    k: list[int]
    category: list[str | None]                  # the row's C (unsigned), or None
    rule: list[str | None]                      # LP / MP / EP, or None
    m: list[int]                                # target count in C of category-rate rows (0 otherwise)
    candidates: list[list[int]] | None = None   # SeqRanking
    answers: list[str] | None = None            # raw generated text (None for a teacher baseline)
    grounded: list[list[int]]                   # grounded entries, -1 = not in the catalog, -2 = no entry
    n_outputs: list[int]                        # titles before truncation (CorrectCount)
    seconds: float | None = None                # generation wall time of the answers (cost measurements)
    cpu_seconds: float | None = None            # ... and its process CPU time (all threads; load-independent)

    def grounded_tensor(self) -> torch.Tensor:
        """[rows, max(k)] grounded entries, padded with NO_ENTRY."""
        width = max([len(g) for g in self.grounded] + list(self.k) + [1])
        out = torch.full((len(self.grounded), width), NO_ENTRY, dtype=torch.long)
        for row, items in enumerate(self.grounded):  # filling a padded tensor
            out[row, : len(items)] = torch.as_tensor(items, dtype=torch.long)
        return out


def test_rows_of(answers: TaskAnswers) -> Rows:
    """The rows a `TaskAnswers` was made from (requests as `ControlRequest` labels), for `metric_inputs`."""
    from recalign.methods.reclmgen.tasks import ControlRequest

    kind, p = parse_test_task(answers.task)
    specs = [ControlRequest(kind, k, c, p=p, m=m if r else None) for k, c, m, r in
             zip(answers.k, answers.category, answers.m, answers.rule)]
    return Rows(np.asarray(answers.users, dtype=np.int64), answers.histories,
                np.asarray(answers.targets, dtype=np.int64), None, answers.candidates, None, specs)


def answer_records(task: str, rows: Rows, grounded: torch.Tensor, n_outputs: torch.Tensor,
                   answers: list[str] | None = None) -> TaskAnswers:
    """A `TaskAnswers` of test rows (labels = ControlRequest) with grounded entries [rows, W] and title counts."""
    specs = rows.labels
    return TaskAnswers(task=task, users=rows.users.tolist(), targets=rows.targets.tolist(),
                       histories=[[int(i) for i in h] for h in rows.histories], k=[s.k for s in specs],
                       category=[s.category for s in specs], rule=[s.rule for s in specs],
                       m=[s.m or 0 for s in specs],
                       candidates=None if rows.candidates is None or any(c is None for c in rows.candidates)
                       else [[int(i) for i in c] for c in rows.candidates],
                       answers=answers, grounded=grounded.tolist(), n_outputs=n_outputs.tolist())


def score_answers(answers: TaskAnswers, categories: CategoryTable, seqrec: TaskAnswers | None = None):
    """(metrics, ListInputs) of one task: §5.6 metrics of every row (SRTargetCategoryRate from `seqrec`)."""
    rows = test_rows_of(answers)
    sr = None
    if seqrec is not None and any(c is not None for c in answers.category):
        position = {u: i for i, u in enumerate(seqrec.users)}
        reference = seqrec.grounded_tensor()
        index = torch.as_tensor([position.get(u, -1) for u in answers.users], dtype=torch.long)
        sr = torch.where((index >= 0)[:, None], reference[index.clamp(min=0)],
                         torch.full((len(index), reference.shape[1]), NO_ENTRY, dtype=torch.long))
    inputs = metric_inputs(rows, answers.grounded_tensor(), categories,
                           n_outputs=torch.as_tensor(answers.n_outputs, dtype=torch.long), sr_grounded=sr)
    return score_control(inputs), inputs


# ---- the run ---------------------------------------------------------------------------------------------------

def run_controllable(config: RecLMGenConfig, dataset, split, teacher, work_dir: str | Path, *,
                     users: np.ndarray | None = None, sft_adapter: str | Path | None = None,
                     log: Callable[[str], None] | None = None, progress: bool = False) -> dict:
    """SFT -> RL -> §5.6 test tasks on `users` (default: every test user), resuming from `work_dir`.

    `sft_adapter`: a finished SFT adapter folder to start from (the init_from stage's), skipping SFT.
    Returns {"sft": [records], "rl": [records], "tasks": {task: TaskAnswers}, "metrics": {task: metrics},
    "sft_adapter": folder of the SFT model used, "rl_tag": "<algorithm>_<iterations>"}.
    """
    config = fill_seeds(config, config.seed if config.seed is not None else 0)
    if config.model is None:
        raise ConfigError("controllable: `model` is not set (and no init_from stage gave one)")
    config.backend.check(where="controllable backend")  # before any training
    say = log or (lambda message: None)
    store = IterationStore(work_dir, fingerprint(config, sft_adapter), key_fields=("loop", "iteration"))
    source = ControlSource.from_split(dataset, split, teacher, config.max_history)
    titles = dataset.titles()
    base = _test_base(dataset, split, config.max_history, users)
    tag = "sft" if config.algorithm == "none" else f"{config.algorithm}_{config.rl_iterations}"
    answers_dir = store.root / ANSWERS_DIR / tag
    tasks = _ordered(config.test_tasks)
    loaded: dict[str, Any] = {}

    def policy():  # the model is built only when something still needs it
        if "model" not in loaded:
            sft_dir = Path(sft_adapter) if sft_adapter is not None else supervised_fine_tuning(
                config, source, titles, store, say, progress)
            loaded["sft_adapter"] = sft_dir
            loaded["model"], loaded["tokenizer"] = reinforce(config, source, titles, sft_dir, store, say, progress)
        return loaded["model"], loaded["tokenizer"]

    rl_done = config.algorithm == "none" or store.last_done(config.algorithm) >= config.rl_iterations
    sft_done = sft_adapter is not None or store.last_done("sft") >= config.sft_epochs
    if not (rl_done and sft_done):
        policy()  # finish training even when every answer exists already (e.g. more iterations asked)

    # §5.6: every test task on the same users, SeqRec first (-C and LP take C from the model's own SeqRec answer)
    done: dict[str, TaskAnswers] = {}
    for task in tasks:
        path = answers_dir / f"{task.replace('+', 'plus_').replace('-', 'minus_')}.json"
        if path.is_file():
            done[task] = TaskAnswers.model_validate_json(path.read_text(encoding="utf-8"))
            continue
        seqrec = done["seqrec"].grounded_tensor() if "seqrec" in done else None
        rows = build_test_rows(base, task, source.categories, config.seed, seqrec_lists=seqrec, teacher=teacher,
                               n_negatives=config.n_negatives)
        say(f"test {task}: {len(rows)} rows")
        model, tokenizer = policy()
        done[task] = generate_answers(config, model, tokenizer, task, rows, titles, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, done[task].model_dump_json())
    store.clean_scratch()
    metrics = {task: score_answers(done[task], source.categories, done.get("seqrec"))[0] for task in tasks}
    records = sorted(store.records, key=lambda r: r.get("iteration", 0))
    return {"sft": [r for r in records if r.get("loop") == "sft"],
            "rl": [r for r in records if r.get("loop") == config.algorithm and r["iteration"] <= config.rl_iterations],
            "tasks": done, "metrics": metrics, "rl_tag": tag,
            "sft_adapter": str(sft_adapter) if sft_adapter is not None
            else str(store.folder("sft", config.sft_epochs) / "adapter")}


# ---- SFT: the task mix, regenerated each epoch ---------------------------------------------------------------

def supervised_fine_tuning(config: RecLMGenConfig, source: ControlSource, titles, store: IterationStore,
                           say: Callable[[str], None], progress: bool) -> Path:
    """θ ← SFT(θ, D_e) for e = 1..E, one checkpoint per epoch; returns the last epoch's adapter folder."""
    from recalign.llm.models import load_model, save_model
    from recalign.llm.tasks import sft_examples
    from recalign.llm.train import train_sft

    task = ControlTask(max_history=config.max_history, seed=config.seed)
    for epoch in store.pending("sft", config.sft_epochs):
        if epoch == 1:
            model, tokenizer = load_model(config.model, device=config.device, lora=config.lora, seed=config.seed,
                                          progress=progress)
        else:
            model, tokenizer = load_model(config.model, device=config.device, seed=config.seed, trainable=True,
                                          adapter=store.folder("sft", epoch - 1) / "adapter", progress=progress)
        rows = sft_rows(source, epoch - 1, config.seed, config.sft_tasks, config.control_re_items)
        rows = sample_rows(rows, config.sft_rows, config.seed + epoch)
        say(f"SFT epoch {epoch}/{config.sft_epochs}: {len(rows)} rows")
        settings = config.sft.model_copy(update={"device": config.device})
        result = train_sft(model, tokenizer, sft_examples(task, rows, titles, tokenizer), settings,
                           output_dir=store.scratch / "sft", progress=progress)
        record = {"loop": "sft", "iteration": epoch, "rows": len(rows), **result.summary()}
        store.commit(store.folder("sft", epoch), record,
                     lambda tmp: save_model(result.model, tokenizer, tmp / "adapter"))
        del model, result
    return store.folder("sft", config.sft_epochs) / "adapter"


# ---- RL: PPO (ours) or GRPO (TRL) with the §5.5 rewards from the teacher --------------------------------------

def rl_prompts(config: RecLMGenConfig, source: ControlSource, titles, tokenizer) -> tuple[Rows, list[str]]:
    """The §5.4 RL rows of every episode (a seeded sample of `rl_rows`) and their rendered prompts."""
    rows = concat_rows([rl_rows(source, episode, config.seed) for episode in range(config.rl_episodes)])
    rows = sample_rows(rows, config.rl_rows, config.seed)
    return rows, prompts_for(ControlTask(max_history=config.max_history), rows, titles, tokenizer)


def reinforce(config: RecLMGenConfig, source: ControlSource, titles, sft_dir: Path, store: IterationStore,
              say: Callable[[str], None], progress: bool):
    """(policy, tokenizer) after `rl_iterations` RL iterations from the SFT model (resuming finished ones)."""
    from recalign.llm.models import load_model

    model, tokenizer = load_model(config.model, device=config.device, seed=config.seed, adapter=sft_dir,
                                  progress=progress)
    if config.algorithm == "none":
        return model, tokenizer
    rows, prompts = rl_prompts(config, source, titles, tokenizer)
    reward_fn = make_reward_fn(rows, prompts, source.teacher, titles, source.categories, tokenizer,
                               alpha=config.alpha, fine_grained=config.reward == "fine_grained")
    say(f"{config.algorithm}: {config.rl_iterations} iterations over {len(prompts)} RL prompts "
        f"({config.prompts_per_iteration} per iteration), {config.reward} rewards")
    if config.algorithm == "ppo":
        from recalign.methods.reclmgen.ppo import PPOTrainer

        settings = config.ppo.model_copy(update={"prompts_per_iteration": config.prompts_per_iteration,
                                                 "device": config.device})
        result = PPOTrainer(model, tokenizer, settings).train(prompts, reward_fn, config.rl_iterations, store=store,
                                                              progress=progress)
        return result.model, tokenizer
    return _grpo_iterations(config, model, tokenizer, prompts, reward_fn, sft_dir, store, progress)


def _grpo_iterations(config: RecLMGenConfig, model, tokenizer, prompts: list[str], reward_fn, sft_dir: Path,
                     store: IterationStore, progress: bool):
    """GRPO iterations 1..N, each over a seeded draw of prompts; iteration i continues iteration i-1's adapter."""
    from recalign.llm.models import save_model
    from recalign.llm.trainer import load_adapter, merged_copy
    from recalign.methods.reclmgen.grpo import train_grpo

    merged = merged_copy(model)  # π_SFT: GRPO's adapter sits on the merged SFT weights (as PPO's does)
    del model
    settings = config.grpo.model_copy(update={"device": config.device})
    for iteration in store.pending("grpo", config.rl_iterations):
        previous = store.folder("grpo", iteration - 1) / "adapter"
        # a fresh copy each time: TRL wraps the model it is given with the adapter in place
        policy = _copy(merged) if iteration == 1 else load_adapter(_copy(merged), previous, trainable=True)
        order = np.random.default_rng([config.seed, iteration]).permutation(len(prompts))
        batch = [prompts[i] for i in order[:config.prompts_per_iteration]]
        result = train_grpo(policy, tokenizer, batch, reward_fn, settings.model_copy(update={"seed": config.seed +
                                                                                             iteration}),
                            output_dir=store.scratch / "grpo", progress=progress)
        record = {"loop": "grpo", "iteration": iteration, "prompts": len(batch), **result.summary()}
        store.commit(store.folder("grpo", iteration), record,
                     lambda tmp: save_model(result.model, tokenizer, tmp / "adapter"))
        del policy, result
    last = store.folder("grpo", config.rl_iterations) / "adapter"
    policy = load_adapter(merged, last)
    policy.eval()
    return policy, tokenizer


def _copy(model):
    import copy

    return copy.deepcopy(model)


# ---- test: greedy answers, parsed, grounded ---------------------------------------------------------------------

def generate_answers(config: RecLMGenConfig, model, tokenizer, task: str, rows: Rows, titles,
                     progress: bool) -> TaskAnswers:
    """Greedy answers of `rows`, parsed into titles and grounded (exact, then Levenshtein <= 3 by default)."""
    from recalign.llm.backends import generate_answers as generate_on
    from recalign.llm.evaluate import ground_lists
    from recalign.llm.generate import GenerationConfig
    from recalign.llm.grounding import make_grounder
    from recalign.llm.tasks import parse_titles

    if len(rows) == 0:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return answer_records(task, rows, empty, torch.zeros(0, dtype=torch.long), [])
    prompts = prompts_for(ControlTask(max_history=config.max_history), rows, titles, tokenizer)
    widest = max(s.k for s in rows.labels)
    settings = GenerationConfig(max_new_tokens=math.ceil(config.max_new_tokens * widest / 10), do_sample=False)
    started, cpu = time.perf_counter(), time.process_time()
    answers = [a[0] for a in generate_on(config.backend, model, tokenizer, prompts, settings,
                                         batch_size=config.batch_size, progress=progress)]
    seconds, cpu = round(time.perf_counter() - started, 3), round(time.process_time() - cpu, 3)
    grounded = ground_lists([parse_titles(a) for a in answers], make_grounder(config.grounding, titles), widest)
    record = answer_records(task, rows, grounded.grounded, grounded.n_outputs, answers)
    return record.model_copy(update={"seconds": seconds, "cpu_seconds": cpu})


def _test_base(dataset, split, max_history: int, users: np.ndarray | None) -> Rows:
    """The SeqRec test rows (history = last `max_history` items, target = the test item) of `users`."""
    base = eval_rows(dataset, split, "test", max_history)
    if users is not None:
        base = base.take(np.flatnonzero(np.isin(base.users, np.asarray(users, dtype=np.int64))))
    if len(base) == 0:
        raise ConfigError("controllable: no test users to evaluate")
    return base


def _ordered(tasks: list[str]) -> list[str]:
    """Test tasks with SeqRec always first: -C and LP read its answers, and it is the list evaluator's row."""
    return ["seqrec"] + [t for t in tasks if t != "seqrec"]


def fingerprint(config: RecLMGenConfig, sft_adapter: str | Path | None = None) -> str:
    """What the stored checkpoints depend on: the config without the fields that may change between attempts."""
    kept = config.model_dump(mode="json", exclude=RESUMABLE_FIELDS)
    return stable_hash({"config": kept, "sft_adapter": None if sft_adapter is None else str(sft_adapter)})


def load_answers(path: str | Path) -> TaskAnswers:
    """A saved `TaskAnswers` JSON file."""
    return TaskAnswers.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))

