"""RecLM-gen (Lu et al., ACL 2024): controllable recommendation by SFT on a task mix, then RL from a teacher.

The algorithm, as `run_controllable` runs it (the same steps in words, the reward formulas and the defaults:
docs/systems/reclmgen.md; settings: `recalign.methods.reclmgen.config.RecLMGenConfig`):

1. **Teacher.** T ← `teacher`: anything that answers batched `topk` and `ranks` (the stage passes a recipe teacher
   stage in process, or a client of `recalign serve teacher` at `http://host:port`).
2. **Model.** θ ← the base model + LoRA (`lora`: r 16, α 8), or the SFT adapter of an earlier stage
   (`sft_adapter`; SFT is then skipped).
3. **SFT** (`supervised_fine_tuning`), for e = 1 .. E (`sft_epochs`), one checkpoint per epoch:
   a. D_e ← the task mix regenerated from (seed, e) with labels from T (`tasks.sft_rows`): SeqRec, ±C
      PersonalControlRec, PersonalCategoryRate LP / MP / EP, ControlRec (+ its reverse category question);
      a seeded sample of `sft_rows` rows;
   b. θ ← SFT(θ, D_e).
4. **RL** (`reinforce`), from π ← the SFT model (PPO and GRPO train adapters on its merged weights):
   a. prompts (`rl_prompts`): the RL tasks (SeqRec, ±C, LP, MP, EP, k ~ U{6..10}) of `rl_episodes` episodes,
      a seeded sample of `rl_rows`;
   b. reward (`rewards.make_reward_fn`): item and list rewards from T's ranks; `fine_grained` puts the item rewards
      on each title's last token plus the list reward on the last token, `list` the list reward alone;
   c. `algorithm: ppo`: N = `rl_iterations` iterations of our PPO (`ppo.PPOTrainer`: actor and critic LoRA, a
      trained value head, KL to π), `prompts_per_iteration` prompts each; `grpo`: N GRPO passes (TRL,
      `grpo_iterations`), each over a seeded draw of prompts; `none`: π is the SFT model (the baseline row).
5. **Test** (`answer_test_tasks`), every test task on the same users, SeqRec first (-C and LP read the model's own
   SeqRec answer):
   a. rows ← the evaluated users (`evaluated_rows`: history = the last 10 items, target = the test item) with the
      task's request (`tasks.build_test_rows`);
   b. answers ← greedy(π, rows); titles parsed and grounded, exact match then Levenshtein <= 3 (`generate_answers`);
   c. metrics (`score_answers`): recall, mrr, ndcg, non_exist, repeat, in_history, correct_count,
      target_category_rate, sr_target_category_rate, category_rate_correct, not_in_candidate (every row counts).

Every function above takes plain objects (a dataset, a split, a teacher, a work folder), no run folder. Everything
is resumable through one `IterationStore` under `work_dir`: each SFT epoch (sft/iter_e), each RL iteration
(ppo/iter_i or grpo/iter_i) and each test task's answers (test/<rl>_<n>/<task>.json) are written atomically, so a
killed run continues where it stopped. The saved answers are `recalign.methods.reclmgen.answers.TaskAnswers`; the
recipe stage is `recalign.methods.reclmgen.stage`, the teacher baselines `recalign.methods.reclmgen.baselines`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from recalign.checkpoints import IterationStore, stable_hash
from recalign.errors import ConfigError
from recalign.eval.lists import NO_ENTRY
from recalign.io import write_atomic
from recalign.llm.tasks import Rows, eval_rows, prompts_for, sample_rows
from recalign.methods.reclmgen.answers import TaskAnswers, answer_records, test_rows_of
from recalign.methods.reclmgen.config import RecLMGenConfig
from recalign.methods.reclmgen.metrics import CategoryTable, score_control
from recalign.methods.reclmgen.rewards import make_reward_fn
from recalign.methods.reclmgen.tasks import (
    ControlSource,
    ControlTask,
    build_test_rows,
    concat_rows,
    metric_inputs,
    rl_rows,
    sft_rows,
)
from recalign.stages import fill_seeds

__all__ = ["RecLMGenConfig", "run_controllable", "supervised_fine_tuning", "rl_prompts", "reinforce",
           "grpo_iterations", "answer_test_tasks", "evaluated_rows", "generate_answers", "score_answers",
           "seqrec_first", "fingerprint", "ANSWERS_DIR"]

ANSWERS_DIR = "test"
# may change between attempts on one work folder (test-time fields never change a checkpoint)
RESUMABLE_FIELDS = {"rl_iterations", "test_tasks", "batch_size", "backend"}


# ---- the run ---------------------------------------------------------------------------------------------------

def run_controllable(config: RecLMGenConfig, dataset, split, teacher, work_dir: str | Path, *,
                     users: np.ndarray | None = None, sft_adapter: str | Path | None = None,
                     log: Callable[[str], None] | None = None, progress: bool = False) -> dict:
    """Steps 1-5: SFT -> RL -> test tasks on `users` (default: every test user), resuming from `work_dir`.

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
    base = evaluated_rows(dataset, split, config.max_history, users)
    tag = "sft" if config.algorithm == "none" else f"{config.algorithm}_{config.rl_iterations}"
    tasks = seqrec_first(config.test_tasks)
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

    done = answer_test_tasks(config, tasks, base, source, teacher, titles, store.root / ANSWERS_DIR / tag, policy,
                             say, progress)
    store.clean_scratch()
    metrics = {task: score_answers(done[task], source.categories, done.get("seqrec"))[0] for task in tasks}
    records = sorted(store.records, key=lambda r: r.get("iteration", 0))
    return {"sft": [r for r in records if r.get("loop") == "sft"],
            "rl": [r for r in records if r.get("loop") == config.algorithm and r["iteration"] <= config.rl_iterations],
            "tasks": done, "metrics": metrics, "rl_tag": tag,
            "sft_adapter": str(sft_adapter) if sft_adapter is not None
            else str(store.folder("sft", config.sft_epochs) / "adapter")}


# ---- step 3, SFT: the task mix, regenerated each epoch ---------------------------------------------------------

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
                     lambda tmp, trained=result.model: save_model(trained, tokenizer, tmp / "adapter"))
        del model, result
    return store.folder("sft", config.sft_epochs) / "adapter"


# ---- step 4, RL: PPO (ours) or GRPO (TRL) with per-item rewards from the teacher -------------------------------

def rl_prompts(config: RecLMGenConfig, source: ControlSource, titles, tokenizer) -> tuple[Rows, list[str]]:
    """The RL rows of every episode (a seeded sample of `rl_rows`) and their rendered prompts."""
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
    return grpo_iterations(config, model, tokenizer, prompts, reward_fn, sft_dir, store, progress)


def grpo_iterations(config: RecLMGenConfig, model, tokenizer, prompts: list[str], reward_fn, sft_dir: Path,
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
                     lambda tmp, trained=result.model: save_model(trained, tokenizer, tmp / "adapter"))
        del policy, result
    last = store.folder("grpo", config.rl_iterations) / "adapter"
    policy = load_adapter(merged, last)
    policy.eval()
    return policy, tokenizer


def _copy(model):
    import copy

    return copy.deepcopy(model)


# ---- step 5, test: greedy answers, parsed, grounded, scored ----------------------------------------------------

def answer_test_tasks(config: RecLMGenConfig, tasks: list[str], base: Rows, source: ControlSource, teacher, titles,
                      answers_dir: Path, policy: Callable[[], tuple[Any, Any]], say: Callable[[str], None],
                      progress: bool) -> dict[str, TaskAnswers]:
    """Every test task on the same users, in `tasks` order (SeqRec first: -C and LP take C from the model's own
    SeqRec answer); a task whose answers are saved under `answers_dir` is read back, `policy()` is asked for the
    model only when a task still needs answering."""
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
    return done


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
    # Stopping once widest + 1 titles are final keeps every row's first k grounded titles and CorrectCount.
    settings = GenerationConfig(max_new_tokens=math.ceil(config.max_new_tokens * widest / 10), do_sample=False,
                                stop_after_titles=widest + 1)
    started, cpu = time.perf_counter(), time.process_time()
    answers = [a[0] for a in generate_on(config.backend, model, tokenizer, prompts, settings,
                                         batch_size=config.batch_size, progress=progress)]
    seconds, cpu = round(time.perf_counter() - started, 3), round(time.process_time() - cpu, 3)
    grounded = ground_lists([parse_titles(a) for a in answers], make_grounder(config.grounding, titles), widest)
    record = answer_records(task, rows, grounded.grounded, grounded.n_outputs, answers)
    return record.model_copy(update={"seconds": seconds, "cpu_seconds": cpu})


def evaluated_rows(dataset, split, max_history: int, users: np.ndarray | None) -> Rows:
    """The SeqRec test rows (history = last `max_history` items, target = the test item) of `users`."""
    base = eval_rows(dataset, split, "test", max_history)
    if users is not None:
        base = base.take(np.flatnonzero(np.isin(base.users, np.asarray(users, dtype=np.int64))))
    if len(base) == 0:
        raise ConfigError("controllable: no test users to evaluate")
    return base


def score_answers(answers: TaskAnswers, categories: CategoryTable, seqrec: TaskAnswers | None = None):
    """(metrics, ListInputs) of one task: the control metrics of every row (SRTargetCategoryRate from `seqrec`)."""
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


def seqrec_first(tasks: list[str]) -> list[str]:
    """Test tasks with SeqRec always first: -C and LP read its answers, and it is the list evaluator's row."""
    return ["seqrec"] + [t for t in tasks if t != "seqrec"]


def fingerprint(config: RecLMGenConfig, sft_adapter: str | Path | None = None) -> str:
    """What the stored checkpoints depend on: the config without the fields that may change between attempts."""
    kept = config.model_dump(mode="json", exclude=RESUMABLE_FIELDS)
    return stable_hash({"config": kept, "sft_adapter": None if sft_adapter is None else str(sft_adapter)})

