"""SPRec (Gao et al., WWW 2025): SFT, then self-play DPO whose negatives are the model's own answers.

The paper's algorithm box, as `run_sprec` runs it (docs/systems/sprec.md; one prompt template for SFT, generation
and DPO: `recalign.llm.prompts`). Input: a base model, train rows D (`train_rows`), N = `iterations`, β = `dpo.beta`.

     1. θ₀ ← SFT(base model + LoRA, `sft_rows` rows of D)                         `_train_stage_zero`
     2. evaluate(θ₀); commit θ₀ to sft/: the "sft" variant and iteration 0 of every other variant
     3. for each variant v in `variants` other than sft (dpo_random, sprec), from θ ← θ₀:
          for i = 1 .. N, resuming after the last committed i:                      `_self_play_iteration`
     4.     P  ← `n_pairs` rows of D, sampled with the seed `seed + 1000·index(v) + i`
     5.     y⁺ ← the ground-truth next item of each row of P
     6.     y⁻ ← sprec:      ground(generate(θ, P)), the current model's own top prediction   `self_play_pairs`
                 dpo_random: a uniform catalog item other than y⁺                            `random_pairs`
     7.     drop rows where y⁻ = y⁺ or y⁻ is no catalog item (`check_pairs`; the original checks neither)
     8.     θ ← SFT step(θ, kept rows of P with y⁺): continue the adapter on the positives (`sft_step`; null = skip)
     9.     θ ← DPO(θ, π_ref = θ frozen, (P, y⁺, y⁻), β)
    10.     evaluate(θ); commit θ to <v>/iter_<i>/
    Output: one record per (variant, iteration), and the last iteration of each variant.

When step 7 drops every pair of an iteration, steps 8-9 are skipped: the model is kept, still evaluated and committed.

Evaluation (docs/metrics.md §2.1 and §2.3, protocol `sprec_rows`): greedy generation, the first quoted title is
embedded and the K nearest catalog titles are the top-K list; HR/NDCG@K, DivRatio@K, ORRatio@K, MGU@K, DGU@K and
AvgPop@K (`SPRecRowsEvaluator`, `sprec_list_metrics`).

Shared blocks: checkpoints, state and resume are `recalign.checkpoints.IterationStore`; SFT and DPO are
`recalign.llm.train` / `recalign.llm.dpo` over `recalign.llm.trainer`. Settings: `recalign.methods.sprec.config`;
tables, plots and the paired comparison with SFT: `recalign.methods.sprec.report`; the recipe stage
(`SPREC_STAGE`): `recalign.methods.sprec.stage`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recalign.checkpoints import IterationStore
from recalign.errors import ConfigError
from recalign.eval import beyond
from recalign.llm.backends import GenerationBackend
from recalign.llm.tasks import Rows, SeqRecTask, eval_rows, prompts_for, sample_rows
from recalign.llm.tasks import train_rows as task_train_rows
from recalign.llm.train import SFTConfig
from recalign.methods.sprec.config import VARIANTS, SPRecConfig, SPRecGenerationConfig
from recalign.stages import fill_seeds

STATE_FILE = "state.json"
MARKER = "metrics.json"  # an iteration folder is finished when its record exists (written last, then renamed)
# may change between attempts on one work folder (the backend only runs evaluation, never the checkpoints)
RESUMABLE_FIELDS = {"variants", "iterations", "compare_resamples", "backend"}


# ---- rows: (history, next item), from the LLM core's SeqRec task ------------------------------------------

def train_rows(dataset, split, max_history: int, users: str = "all") -> Rows:
    """One row per user from the train part: history = train sequence without its last item, target = last item.

    `users="train_only"` keeps users without valid/test items (SPRec's separate train file of Alpaca rows).
    """
    rows = task_train_rows(dataset, split, max_history)
    if users == "train_only":
        later = np.unique(np.concatenate([split.valid["user_id"].to_numpy(), split.test["user_id"].to_numpy()]))
        rows = rows.take(np.flatnonzero(~np.isin(rows.users, later)))
    return rows


# ---- preference pairs (steps 5-7) ----------------------------------------------------------------------

@dataclass
class Pairs:
    """DPO pairs over rows: chosen = target item, rejected = an item id (or a raw title in parity mode)."""

    rows: Rows
    rejected_items: np.ndarray            # [P] item ids (-1 where the parity mode keeps a raw title)
    rejected_titles: list[str]            # [P] what the rejected completion names
    generations: list[str] | None = None  # [P] the model's raw answers (self-play only)
    dropped_equal: int = 0
    dropped_ungrounded: int = 0

    def __len__(self) -> int:
        return len(self.rows)


def self_play_pairs(rows: Rows, generations: list[str], grounder, titles: list[str], check: bool = True) -> Pairs:
    """Rejected = the item the model's own answer grounds to; drop rows where it equals the target or is not grounded.

    With `check=False` (the original) the rejected completion is the raw generated title, kept unconditionally.
    """
    from recalign.llm.grounding import extract_title

    generated = [extract_title(g) for g in generations]
    if not check:
        return Pairs(rows, np.full(len(rows), -1, dtype=np.int64), generated, list(generations))
    rejected = grounder.ground(generated).numpy().astype(np.int64)
    ungrounded = rejected < 0
    equal = (rejected == rows.targets) & ~ungrounded
    keep = np.flatnonzero(~ungrounded & ~equal)
    return Pairs(rows.take(keep), rejected[keep], [titles[i] for i in rejected[keep]],
                 [generations[i] for i in keep], dropped_equal=int(equal.sum()),
                 dropped_ungrounded=int(ungrounded.sum()))


def random_pairs(rows: Rows, n_items: int, titles: list[str], seed: int) -> Pairs:
    """Rejected = a uniform catalog item other than the target (the DPO baseline of the paper)."""
    if n_items < 2:
        raise ConfigError("dpo_random needs a catalog of at least 2 items")
    generator = torch.Generator().manual_seed(seed)
    draw = torch.randint(0, n_items - 1, (len(rows),), generator=generator).numpy()
    rejected = draw + (draw >= rows.targets)  # skip the target: uniform over the other n_items - 1 items
    return Pairs(rows, rejected.astype(np.int64), [titles[i] for i in rejected])


# ---- the loop (steps 1-10) -------------------------------------------------------------------------------

IterationHook = Callable[[str, int], None]


@dataclass
class _Run:
    """What every step of one `run_sprec` call shares."""

    config: SPRecConfig  # seeds filled (`fill_seeds`)
    dataset: Any
    store: IterationStore
    titles: list[str]
    grounder: Any
    train: Rows
    evaluate: Callable
    say: Callable[[str], None]
    progress: bool


def run_sprec(config: SPRecConfig, dataset, split, work_dir: str | Path, *, progress: bool = False,
              on_iteration_start: IterationHook | None = None, log: Callable[[str], None] | None = None,
              evaluator: Callable | None = None) -> dict:
    """Run SFT and every configured variant for `config.iterations` iterations, resuming from `work_dir`.

    Returns {"iterations": [{variant, iteration, metrics...}, ...], "final": {variant: metrics}}; the same table
    is kept in work_dir/state.json after every finished iteration (`recalign.checkpoints`).
    `evaluator` ((model, tokenizer) -> metrics, keeping `answers_`) replaces the `sprec_rows` evaluation, e.g. the
    recipe's evaluator on its users (`recalign.llm.answers.RecipeAnswers`).
    """
    run = _start_run(config, dataset, split, work_dir, progress, log, evaluator)
    sft_dir = _train_stage_zero(run)  # steps 1-2
    for variant in [v for v in run.config.variants if v != "sft"]:  # step 3
        for iteration in run.store.pending(variant, run.config.iterations):  # finished ones are never recomputed
            if on_iteration_start is not None:
                on_iteration_start(variant, iteration)
            _self_play_iteration(run, variant, iteration, sft_dir)  # steps 4-10
    run.store.clean_scratch()
    return _summary(run.store.records, run.config)


def _start_run(config: SPRecConfig, dataset, split, work_dir: str | Path, progress: bool,
               log: Callable[[str], None] | None, evaluator: Callable | None) -> _Run:
    """The work folder's iteration store, the grounder, the train rows D and the evaluator of one run."""
    from recalign.llm.grounding import make_grounder

    config = fill_seeds(config, config.seed)  # the one seed rule: sft/dpo seeds follow `seed` unless set
    store = IterationStore(work_dir, config_fingerprint(config), marker=MARKER, state_file=STATE_FILE,
                           key_fields=("variant", "iteration"))
    say = log or (lambda message: None)
    titles = dataset.titles()
    grounder = make_grounder(config.grounding, titles)
    train = train_rows(dataset, split, config.max_history, config.train_users)
    if len(train) == 0:
        raise ConfigError("SPRec: no train rows (every user needs >= 2 train interactions)")
    config.backend.check(where="sprec backend")  # before any training
    evaluate = evaluator or make_evaluator(config, dataset, split, grounder, progress)
    return _Run(config, dataset, store, titles, grounder, train, evaluate, say, progress)


def _train_stage_zero(run: _Run) -> Path:
    """Steps 1-2: θ₀ ← SFT(base + LoRA, train rows), evaluated and committed to sft/ (unless already there)."""
    config, store = run.config, run.store
    sft_dir = store.folder("sft")
    if not store.done(sft_dir):
        run.say("stage 0: SFT")
        model, tokenizer = _base_model(config)
        rows = sample_rows(run.train, config.sft_rows, config.seed)
        model = _sft(model, tokenizer, rows, run.titles, config.sft, config, store.scratch, run.progress)
        metrics = run.evaluate(model, tokenizer)
        store.commit(sft_dir, {"variant": "sft", "iteration": 0, **metrics},
                     _checkpoint_writer(model, tokenizer, run.evaluate.answers_))
    return sft_dir


def _self_play_iteration(run: _Run, variant: str, iteration: int, sft_dir: Path) -> None:
    """Steps 4-10 of one (variant, iteration): pairs on the previous checkpoint, SFT step, DPO, evaluate, commit."""
    config, store = run.config, run.store
    run.say(f"{variant}: iteration {iteration}/{config.iterations}")
    model, tokenizer = load_checkpoint(store.previous(variant, iteration, sft_dir), config)
    seed = config.seed + 1000 * VARIANTS.index(variant) + iteration
    prompts = sample_rows(run.train, config.n_pairs, seed)  # steps 4-5: P, with y⁺ = each row's target
    pairs = _preference_pairs(run, variant, model, tokenizer, prompts, seed)  # steps 6-7
    model, dpo_log = _preference_step(run, variant, iteration, model, tokenizer, pairs)  # steps 8-9
    metrics = run.evaluate(model, tokenizer)  # step 10
    record = {"variant": variant, "iteration": iteration, **metrics, **dpo_log,
              "pairs": len(pairs), "dropped_equal": pairs.dropped_equal,
              "dropped_ungrounded": pairs.dropped_ungrounded}
    store.commit(store.folder(variant, iteration), record,
                 _checkpoint_writer(model, tokenizer, run.evaluate.answers_, pairs, run.titles))


def _preference_pairs(run: _Run, variant: str, model, tokenizer, prompts: Rows, seed: int) -> Pairs:
    """Steps 6-7: y⁻ = the current model's own top prediction, grounded and checked (sprec), or a random item."""
    if variant == "sprec":
        answers = _generate(model, tokenizer, prompts, run.titles, run.config.pair_generation, run.config,
                            run.progress)
        return self_play_pairs(prompts, answers, run.grounder, run.titles, check=run.config.check_pairs)
    return random_pairs(prompts, run.dataset.n_items, run.titles, seed)


def _preference_step(run: _Run, variant: str, iteration: int, model, tokenizer, pairs: Pairs) -> tuple[Any, dict]:
    """Steps 8-9: SFT step on the positives (unless `sft_step` is null), then DPO; returns (model, DPO log).

    Without pairs there is nothing to learn from: the model is returned unchanged (still evaluated and committed).
    """
    if len(pairs) == 0:
        run.say(f"{variant} iteration {iteration}: every pair was dropped ({pairs.dropped_equal} equal to the "
                f"target, {pairs.dropped_ungrounded} ungrounded); the model is unchanged")
        return model, {}
    if run.config.sft_step is not None:  # continue the adapter on the positives, then DPO from there
        model = _sft(model, tokenizer, pairs.rows, run.titles, run.config.sft_step, run.config, run.store.scratch,
                     run.progress)
    return _dpo(model, tokenizer, pairs, run.titles, run.config, run.store.scratch, run.progress)


def _summary(records: list[dict], config: SPRecConfig) -> dict:
    """Rows sorted by (variant, iteration) and the last iteration of each variant."""
    rows = sorted(records, key=lambda r: (VARIANTS.index(r["variant"]), r["iteration"]))
    final: dict[str, dict] = {}
    for record in rows:
        if record["variant"] == "sft" or record["variant"] in config.variants:
            final[record["variant"]] = record
    return {"iterations": rows, "final": final}


# ---- evaluation (protocol `sprec_rows`) ------------------------------------------------------------------

class SPRecRowsEvaluator:
    """Greedy answer -> K nearest catalog items -> accuracy and beyond-accuracy metrics at every K.

    After each call `answers_` holds the per-row record (user, target, raw answer, top-K item ids), which every
    checkpoint keeps as eval_answers.jsonl, e.g. for paired comparisons between variants.
    """

    def __init__(self, config: SPRecConfig, dataset, rows: Rows, grounder, popularity: np.ndarray, progress: bool):
        self.config, self.dataset, self.rows, self.grounder = config, dataset, rows, grounder
        self.popularity, self.progress = torch.as_tensor(popularity), progress
        self.genres = tracked_genres(dataset, config.genres)
        self.genre_weights = beyond.genre_weights(dataset.item_categories(), self.genres)  # [items, G], built once

    def __call__(self, model, tokenizer) -> dict:
        from recalign.llm.grounding import extract_title

        answers = _generate(model, tokenizer, self.rows, self.dataset.titles(), self.config.eval_generation,
                            self.config, self.progress, self.config.backend)
        generated = [extract_title(a) for a in answers]
        k_max = max(self.config.ks)
        lists = self.grounder.topk(generated, k_max)
        self.answers_ = [{"user": int(u), "target": int(t), "answer": a, "top_k": row}
                         for u, t, a, row in zip(self.rows.users, self.rows.targets, answers, lists.tolist())]
        return self.score(lists)

    def score(self, lists: torch.Tensor, index: np.ndarray | None = None) -> dict:
        """Metrics of top-K lists on the evaluation rows (all of them, or rows `index`, repeats allowed)."""
        if index is None:
            return sprec_list_metrics(lists, torch.as_tensor(self.rows.targets), self.rows.histories,
                                      self.config.ks, self.popularity, self.genre_weights, self.genres)
        chosen = torch.from_numpy(index)
        return sprec_list_metrics(lists[chosen], torch.as_tensor(self.rows.targets)[chosen],
                                  [self.rows.histories[i] for i in index], self.config.ks, self.popularity,
                                  self.genre_weights, self.genres)


def sprec_list_metrics(lists: torch.Tensor, targets: torch.Tensor, histories: list[list[int]], ks: list[int],
                       popularity: torch.Tensor, item_genres: list[list[str]] | torch.Tensor,
                       genres: list[str]) -> dict:
    """The one list evaluator (`recalign.eval.lists`): accuracy (docs/metrics.md §2.1) and DivRatio, ORRatio,
    AvgPop, MGU and DGU@K (docs/metrics.md §2.3).

    `item_genres`: each item's genres, or their `beyond.genre_weights` table (faster for repeated calls).
    """
    from recalign.eval.lists import ListInputs, score_lists

    if not isinstance(item_genres, torch.Tensor):  # build the [items, genres] table once for every K
        item_genres = beyond.genre_weights(item_genres, genres)
    return score_lists(ListInputs(lists, targets, len(item_genres), popularity=popularity, history=histories,
                                  genre_table=item_genres), ks)


def tracked_genres(dataset, genres: list[str] | None) -> list[str]:
    """The tracked genre set G: `genres`, or every category that occurs in the catalog."""
    if genres is not None:
        return list(genres)
    return sorted({c for cats in dataset.item_categories() for c in cats})


def make_evaluator(config: SPRecConfig, dataset, split, grounder, progress: bool) -> SPRecRowsEvaluator:
    """The evaluator every variant and iteration shares: the same (seeded) rows, grounding and popularity."""
    test = eval_rows(dataset, split, config.eval_part, config.max_history)
    if config.eval_rows is not None:
        test = sample_rows(test, config.eval_rows, config.seed + 7919)
    popularity = np.bincount(split.train["item_id"].to_numpy(), minlength=dataset.n_items)
    return SPRecRowsEvaluator(config, dataset, test, grounder, popularity, progress)


# ---- checkpoints and state --------------------------------------------------------------------------------

def checkpoint_folders(work_dir: str | Path) -> dict[tuple[str, int], Path]:
    """{(variant, iteration): folder} of every finished checkpoint in a work folder, SFT as ("sft", 0)."""
    work = Path(work_dir)
    found = {("sft", 0): work / "sft"} if _finished(work / "sft") else {}
    for variant in VARIANTS[1:]:
        for folder in sorted((work / variant).glob("iter_*")):
            if _finished(folder) and folder.name[5:].isdigit():
                found[(variant, int(folder.name[5:]))] = folder
    return dict(sorted(found.items(), key=lambda item: (VARIANTS.index(item[0][0]), item[0][1])))


def _finished(folder: Path) -> bool:
    """A finished checkpoint folder (the iteration store's marker is written last)."""
    return (folder / MARKER).is_file()


def config_fingerprint(config: SPRecConfig) -> dict:
    """What the stored iterations depend on: the config without the fields that may grow between attempts."""
    return config.model_dump(mode="json", exclude=RESUMABLE_FIELDS)


def load_checkpoint(folder: Path, config: SPRecConfig):
    """The base model with the adapter saved in `folder`, trainable."""
    from recalign.llm.models import load_model

    return load_model(config.model, dtype="float32", adapter=folder / "adapter", trainable=True, seed=config.seed,
                      progress=False)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON record per line, written atomically."""
    from recalign.io import write_atomic

    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def _checkpoint_writer(model, tokenizer, answers: list[dict], pairs: Pairs | None = None,
                       titles: list[str] | None = None) -> Callable[[Path], None]:
    """What one checkpoint folder holds: the adapter (+ tokenizer), eval_answers.jsonl and, after DPO, pairs.jsonl."""
    def write(tmp: Path) -> None:
        if pairs is not None:
            _write_pairs(tmp / "pairs.jsonl", pairs, titles or [])
        write_jsonl(tmp / "eval_answers.jsonl", answers)
        model.save_pretrained(tmp / "adapter")
        tokenizer.save_pretrained(tmp / "adapter")

    return write


def _write_pairs(path: Path, pairs: Pairs, titles: list[str]) -> None:
    """The pairs of one iteration, for inspection (chosen/rejected item ids and titles, the raw answer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for j in range(len(pairs)):
            record = {"user": int(pairs.rows.users[j]), "chosen": int(pairs.rows.targets[j]),
                      "chosen_title": titles[int(pairs.rows.targets[j])],
                      "rejected": int(pairs.rejected_items[j]), "rejected_title": pairs.rejected_titles[j]}
            if pairs.generations is not None:
                record["generation"] = pairs.generations[j]
            out.write(json.dumps(record) + "\n")


# ---- LLM blocks: one prompt template for SFT, generation and DPO ------------------------------------------

def _prompts(tokenizer, rows: Rows, titles: list[str], config: SPRecConfig) -> list[str]:
    """The chat-rendered SeqRec prompt of every row (the same strings for SFT, generation and DPO)."""
    return prompts_for(SeqRecTask(max_history=config.max_history), rows, titles, tokenizer)


def _answer_text(title: str, config: SPRecConfig) -> str:
    """The completion naming one item (the SeqRec template's quoted title; EOS is appended by the trainers)."""
    return SeqRecTask(max_history=config.max_history).completion([title])


def _base_model(config: SPRecConfig):
    """Base model (`recalign.llm.models`: HF id, folder, GGUF, "smollm2" or "tiny") with a fresh LoRA adapter."""
    from recalign.llm.models import load_model

    return load_model(config.model, dtype="float32", lora=config.lora, seed=config.seed, progress=False)


def _sft(model, tokenizer, rows: Rows, titles: list[str], settings: SFTConfig, config: SPRecConfig, scratch: Path,
         progress: bool):
    """Continue the LoRA adapter on prompt -> ground-truth answer (loss on the answer tokens only)."""
    from recalign.llm.train import train_sft

    examples = [{"prompt": p, "completion": _answer_text(titles[int(t)], config)}
                for p, t in zip(_prompts(tokenizer, rows, titles, config), rows.targets)]
    return train_sft(model, tokenizer, examples, settings,
                     output_dir=scratch, progress=progress).model


def _generate(model, tokenizer, rows: Rows, titles: list[str], settings: SPRecGenerationConfig, config: SPRecConfig,
              progress: bool, backend: GenerationBackend | None = None) -> list[str]:
    """Greedy answers for every row (`recalign.llm.backends`; transformers unless `backend` says otherwise)."""
    from recalign.llm.backends import generate_answers
    from recalign.llm.generate import GenerationConfig as Decoding

    answers = generate_answers(backend, model, tokenizer, _prompts(tokenizer, rows, titles, config),
                               Decoding(max_new_tokens=settings.max_new_tokens), batch_size=settings.batch_size,
                               progress=progress)
    return [a[0] for a in answers]


def _dpo(model, tokenizer, pairs: Pairs, titles: list[str], config: SPRecConfig, scratch: Path, progress: bool):
    """DPO on (prompt, ground truth, rejected); π_ref = the incoming adapter, frozen (TRL's "ref" adapter copy)."""
    from recalign.llm.dpo import train_dpo

    records = [{"prompt": p, "chosen": _answer_text(titles[int(t)], config), "rejected": _answer_text(r, config)}
               for p, t, r in zip(_prompts(tokenizer, pairs.rows, titles, config), pairs.rows.targets,
                                  pairs.rejected_titles)]
    settings = config.dpo
    result = train_dpo(model, tokenizer, records, settings, output_dir=scratch, progress=progress)
    return result.model, result.summary()
