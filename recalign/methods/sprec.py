"""SPRec (Gao et al., WWW 2025; systems.md §3): SFT, then self-play DPO whose negatives are the model's own answers.

The algorithm, as `run_sprec` runs it (one template for SFT, generation and DPO: `recalign.llm.prompts`):

    θ₀ ← SFT(base model + LoRA, train rows)                          stage 0, also the "sft" baseline
    evaluate(θ₀)                                                      iteration 0 of every variant
    for variant v in {dpo_random, sprec}:
        θ ← θ₀
        for i = 1 .. N:
            P  ← n_pairs train rows, sampled with seed (seed, v, i)
            y⁺ ← the ground-truth next item of each row
            y⁻ ← sprec:      ground(generate(θ, P))   the current model's own top prediction
                 dpo_random: a uniform catalog item
            drop rows where y⁻ = y⁺ or y⁻ is not a catalog item        (recalign; the original checks neither)
            θ ← SFT step(θ, rows with y⁺)                             continue the adapter on the positives
            θ ← DPO(θ, π_ref = θ frozen, (P, y⁺, y⁻), β)
            evaluate(θ); save θ to iter_<i>/ ; state.json ← i         a killed loop resumes after the last i

Evaluation (metrics.md §2.3, protocol `sprec_rows`): greedy generation, the first quoted title is embedded and
the K nearest catalog titles are the top-K list; HR/NDCG@K, DivRatio@K, ORRatio@K, MGU@K, DGU@K and AvgPop@K.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError
from recalign.eval import beyond
from recalign.llm.dpo import DPOSettings, LoraSettings
from recalign.llm.grounding import GroundingConfig
from recalign.llm.train import SFTSettings
from recalign.llm.tasks import Rows, SeqRecTask, eval_rows, prompts_for, sample_rows
from recalign.llm.tasks import train_rows as task_train_rows

VARIANTS = ("sft", "dpo_random", "sprec")
STATE_FILE = "state.json"
RESUMABLE_FIELDS = {"variants", "iterations", "compare_resamples"}  # may change between attempts on one work folder


# ---- configuration ------------------------------------------------------------------------------------

class GenerationSettings(BaseModel):
    """Greedy decoding of one title per prompt."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(32, ge=1, description="tokens per answer (SPRec: 128 for pairs, 32 for evaluation)")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")


class SPRecConfig(BaseModel):
    """Everything one SPRec run depends on; defaults follow the original where it is sound."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("tiny", description="base model: HF id, local folder, .gguf file, or 'tiny' (random Llama)")
    variants: list[Literal["sft", "dpo_random", "sprec"]] = Field(
        default_factory=lambda: list(VARIANTS), description="which variants to run; 'sft' is the stage-0 model")
    iterations: int = Field(5, ge=1, description="self-play iterations N (SPRec README: 5)")
    n_pairs: int = Field(2048, ge=1, description="train prompts sampled per iteration (SPRec: 2048)")
    max_history: int = Field(10, ge=1, description="most recent history titles in a prompt")
    train_users: Literal["all", "train_only"] = Field(
        "all", description="rows from every user's train sequence, or only users without valid/test items "
                           "(SPRec's separate Alpaca train file)")
    sft_rows: int = Field(4096, ge=1, description="train rows sampled for the stage-0 SFT (SPRec: 4096)")
    sft: SFTSettings = Field(default_factory=lambda: SFTSettings(epochs=4.0, learning_rate=3e-4, batch_size=4,
                                                                 grad_accum=4, max_length=512),
                             description="stage-0 SFT (SPRec: 4 epochs, lr 3e-4, 4x4)")
    sft_step: SFTSettings | None = Field(
        default_factory=lambda: SFTSettings(epochs=1.0, learning_rate=2e-5, batch_size=4, grad_accum=4,
                                            max_length=512),
        description="per-iteration SFT on the positives before DPO (null = skip; SPRec: 1 epoch, lr 2e-5)")
    dpo: DPOSettings = Field(default_factory=DPOSettings, description="the DPO step (β = 0.1, lr 2e-5, 2×4)")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter (r 16, α 32, dropout 0.05)")
    grounding: GroundingConfig = Field(default_factory=lambda: GroundingConfig(kind="embedding"),
                                       description="generated title -> catalog items (SPRec: embedding k-NN)")
    pair_generation: GenerationSettings = Field(default_factory=lambda: GenerationSettings(max_new_tokens=64),
                                                description="decoding of the self-play negatives")
    eval_generation: GenerationSettings = Field(default_factory=GenerationSettings,
                                                description="decoding at evaluation")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="cut-offs K")
    eval_part: Literal["valid", "test"] = Field("test", description="split part evaluated after every iteration")
    eval_rows: int | None = Field(None, ge=1, description="evaluate a seeded subsample of this many rows (null = all)")
    genres: list[str] | None = Field(None, description="tracked genres G for MGU/DGU (null = every item category)")
    check_pairs: bool = Field(True, description="drop pairs whose rejected item is ungrounded or equals chosen; "
                                                "false = the original (raw generated title, no checks)")
    seed: int = Field(0, description="seed of the row samples, random negatives and training")
    compare_resamples: int = Field(1000, ge=0, description="bootstrap resamples and permutations of the paired "
                                                           "comparison of every checkpoint with SFT (0 = skip)")


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


# ---- preference pairs ----------------------------------------------------------------------------------

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


# ---- the loop ------------------------------------------------------------------------------------------

IterationHook = Callable[[str, int], None]


def run_sprec(config: SPRecConfig, dataset, split, work_dir: str | Path, *, progress: bool = False,
              on_iteration_start: IterationHook | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run SFT and every configured variant for `config.iterations` iterations, resuming from `work_dir`.

    Returns {"iterations": [{variant, iteration, metrics...}, ...], "final": {variant: metrics}}; the same table
    is kept in work_dir/state.json after every finished iteration.
    """
    from recalign.llm.grounding import make_grounder

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    say = log or (lambda message: None)
    state = _load_state(work, config)
    titles = dataset.titles()
    grounder = make_grounder(config.grounding, titles)
    train = train_rows(dataset, split, config.max_history, config.train_users)
    if len(train) == 0:
        raise ConfigError("SPRec: no train rows (every user needs >= 2 train interactions)")
    evaluate = _make_evaluator(config, dataset, split, grounder, progress)

    # Stage 0: SFT on train rows -> the "sft" variant (iteration 0 of every variant).
    sft_dir = work / "sft"
    if not _finished(sft_dir):
        say("stage 0: SFT")
        model, tokenizer = _base_model(config)
        rows = sample_rows(train, config.sft_rows, config.seed)
        model = _sft(model, tokenizer, rows, titles, config.sft, config, work / "tmp", progress)
        metrics = evaluate(model, tokenizer)
        _save_checkpoint(model, tokenizer, sft_dir, {"variant": "sft", "iteration": 0, **metrics},
                         extra=lambda tmp: _write_jsonl(tmp / "eval_answers.jsonl", evaluate.answers_))
        state["iterations"] = [r for r in state["iterations"] if r["iteration"] != 0]
        state["iterations"].append({"variant": "sft", "iteration": 0, **metrics})
        _write_state(work, state)
        del model

    for variant in [v for v in config.variants if v != "sft"]:
        for iteration in range(1, config.iterations + 1):
            folder = work / variant / f"iter_{iteration}"
            if _finished(folder):
                continue  # a finished iteration is never recomputed
            if on_iteration_start is not None:
                on_iteration_start(variant, iteration)
            say(f"{variant}: iteration {iteration}/{config.iterations}")
            previous = sft_dir if iteration == 1 else work / variant / f"iter_{iteration - 1}"
            model, tokenizer = _load_checkpoint(previous, config)
            seed = config.seed + 1000 * VARIANTS.index(variant) + iteration
            prompts = sample_rows(train, config.n_pairs, seed)
            if variant == "sprec":  # y⁻ = the current model's own top prediction, grounded
                answers = _generate(model, tokenizer, prompts, titles, config.pair_generation, config, progress)
                pairs = self_play_pairs(prompts, answers, grounder, titles, check=config.check_pairs)
            else:  # y⁻ = a random catalog item
                pairs = random_pairs(prompts, dataset.n_items, titles, seed)
            dpo_log: dict = {}
            if len(pairs) == 0:  # nothing to learn from: keep the model, still evaluate and checkpoint
                say(f"{variant} iteration {iteration}: every pair was dropped ({pairs.dropped_equal} equal to the "
                    f"target, {pairs.dropped_ungrounded} ungrounded); the model is unchanged")
            else:
                if config.sft_step is not None:  # continue the adapter on the positives, then DPO from there
                    model = _sft(model, tokenizer, pairs.rows, titles, config.sft_step, config,
                                 work / "tmp", progress)
                model, dpo_log = _dpo(model, tokenizer, pairs, titles, config, work / "tmp", progress)
            metrics = evaluate(model, tokenizer)
            record = {"variant": variant, "iteration": iteration, **metrics, **dpo_log,
                      "pairs": len(pairs), "dropped_equal": pairs.dropped_equal,
                      "dropped_ungrounded": pairs.dropped_ungrounded}
            _save_checkpoint(model, tokenizer, folder, record,
                             extra=lambda tmp: (_write_pairs(tmp / "pairs.jsonl", pairs, titles),
                                                _write_jsonl(tmp / "eval_answers.jsonl", evaluate.answers_)))
            state["iterations"] = [r for r in state["iterations"]
                                   if (r["variant"], r["iteration"]) != (variant, iteration)]
            state["iterations"].append(record)
            _write_state(work, state)
            del model
    shutil.rmtree(work / "tmp", ignore_errors=True)
    return _summary(state, config)


def _summary(state: dict, config: SPRecConfig) -> dict:
    """Rows sorted by (variant, iteration) and the last iteration of each variant."""
    rows = sorted(state["iterations"], key=lambda r: (VARIANTS.index(r["variant"]), r["iteration"]))
    final: dict[str, dict] = {}
    for record in rows:
        if record["variant"] == "sft" or record["variant"] in config.variants:
            final[record["variant"]] = record
    return {"iterations": rows, "final": final}


# ---- evaluation -----------------------------------------------------------------------------------------

class _Evaluator:
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
                            self.config, self.progress)
        generated = [extract_title(a) for a in answers]
        k_max = max(self.config.ks)
        lists = self.grounder.topk(generated, k_max)
        targets = torch.as_tensor(self.rows.targets)
        self.answers_ = [{"user": int(u), "target": int(t), "answer": a, "top_k": row}
                         for u, t, a, row in zip(self.rows.users, self.rows.targets, answers, lists.tolist())]
        return self.score(lists)

    def score(self, lists: torch.Tensor, index: np.ndarray | None = None) -> dict:
        """Metrics of top-K lists on the evaluation rows (all of them, or rows `index`, repeats allowed)."""
        if index is None:
            return list_metrics(lists, torch.as_tensor(self.rows.targets), self.rows.histories, self.config.ks,
                                self.popularity, self.genre_weights, self.genres)
        chosen = torch.from_numpy(index)
        return list_metrics(lists[chosen], torch.as_tensor(self.rows.targets)[chosen],
                            [self.rows.histories[i] for i in index], self.config.ks, self.popularity,
                            self.genre_weights, self.genres)


def list_metrics(lists: torch.Tensor, targets: torch.Tensor, histories: list[list[int]], ks: list[int],
                 popularity: torch.Tensor, item_genres: "list[list[str]] | torch.Tensor", genres: list[str]) -> dict:
    """The one list evaluator (`recalign.eval.lists`): §2.1 accuracy and §2.3 DivRatio/ORRatio/AvgPop/MGU/DGU@K.

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


def _make_evaluator(config: SPRecConfig, dataset, split, grounder, progress: bool) -> "_Evaluator":
    """The evaluator every variant and iteration shares: the same (seeded) rows, grounding and popularity."""
    test = eval_rows(dataset, split, config.eval_part, config.max_history)
    if config.eval_rows is not None:
        test = sample_rows(test, config.eval_rows, config.seed + 7919)
    popularity = np.bincount(split.train["item_id"].to_numpy(), minlength=dataset.n_items)
    return _Evaluator(config, dataset, test, grounder, popularity, progress)


def checkpoint_folders(work_dir: str | Path) -> dict[tuple[str, int], Path]:
    """{(variant, iteration): folder} of every finished checkpoint in a work folder, SFT as ("sft", 0)."""
    work = Path(work_dir)
    found = {("sft", 0): work / "sft"} if _finished(work / "sft") else {}
    for variant in VARIANTS[1:]:
        for folder in sorted((work / variant).glob("iter_*")):
            if _finished(folder) and folder.name[5:].isdigit():
                found[(variant, int(folder.name[5:]))] = folder
    return dict(sorted(found.items(), key=lambda item: (VARIANTS.index(item[0][0]), item[0][1])))


def compare_against_sft(config: SPRecConfig, dataset, split, work_dir: str | Path,
                          keys: tuple[str, ...] = ("hr@5", "ndcg@5", "div_ratio@5", "or_ratio@5", "mgu@5", "dgu@5"),
                          n_resamples: int = 1000, seed: int = 0, progress: bool = False,
                          log: Callable[[str], None] | None = None, eval_rows: int | None = None) -> list[dict]:
    """(checkpoint - SFT) on the same evaluation rows, for every finished checkpoint of a run.

    `eval_rows` (optional) compares on a different number of evaluation rows than the run used (e.g. more, for
    tighter intervals): every checkpoint is then evaluated on them once, into eval_answers_<n>rows.jsonl.

    Two paired analyses: a bootstrap interval (sound for the per-row means HR and NDCG; resampling duplicates rows,
    which biases set metrics such as DivRatio) and a permutation test that swaps the two models' lists row by row
    (sound for every metric). Uses each checkpoint's eval_answers.jsonl; a checkpoint saved without one (older
    runs) is evaluated again from its adapter, and the recomputed metrics must equal the stored ones.
    Returns [{"variant", "iteration", "bootstrap": {key: {a, b, diff, low, high}},
              "permutation": {key: {a, b, diff, p_value}}}].
    """
    from recalign.eval.bootstrap import paired_bootstrap, paired_permutation_test
    from recalign.llm.grounding import make_grounder

    say = log or (lambda message: None)
    own_rows = eval_rows is None or eval_rows == config.eval_rows
    if not own_rows:
        config = config.model_copy(update={"eval_rows": eval_rows})
    answers_file = "eval_answers.jsonl" if own_rows else f"eval_answers_{eval_rows}rows.jsonl"
    evaluate = _make_evaluator(config, dataset, split, make_grounder(config.grounding, dataset.titles()), progress)
    folders = checkpoint_folders(work_dir)
    if ("sft", 0) not in folders:
        raise ConfigError(f"{work_dir}: no finished SFT checkpoint to compare against")
    rows = evaluate.rows
    lists: dict[tuple[str, int], torch.Tensor] = {}
    for key, folder in folders.items():
        path = folder / answers_file
        if not path.is_file():
            say(f"{key[0]} iteration {key[1]}: no per-row answers on these rows yet; evaluating the checkpoint")
            model, tokenizer = _load_checkpoint(folder, config)
            metrics = evaluate(model, tokenizer)
            stored = json.loads((folder / "metrics.json").read_text())
            changed = [k for k in keys if abs(metrics[k] - stored[k]) > 1e-9] if own_rows else []
            if changed:
                raise ConfigError(f"{folder}: re-evaluation does not reproduce the stored {', '.join(changed)}")
            _write_jsonl(path, evaluate.answers_)
            del model
        answers = [json.loads(line) for line in path.read_text().splitlines()]
        if [a["user"] for a in answers] != rows.users.tolist():
            raise ConfigError(f"{path}: rows differ from this config's evaluation rows")
        lists[key] = torch.tensor([a["top_k"] for a in answers], dtype=torch.long)

    def on_rows(key):
        return lambda index: evaluate.score(lists[key], index)

    out = []
    for key in folders:
        if key == ("sft", 0):
            continue
        out.append({"variant": key[0], "iteration": key[1],
                    "bootstrap": paired_bootstrap(on_rows(key), on_rows(("sft", 0)), len(rows), keys, n_resamples,
                                                  seed=seed),
                    "permutation": paired_permutation_test(lists[key], lists[("sft", 0)], evaluate.score, keys,
                                                           n_resamples, seed=seed)})
    return out


# ---- checkpoints and state --------------------------------------------------------------------------------

def _finished(folder: Path) -> bool:
    return (folder / "metrics.json").is_file()


def _save_checkpoint(model, tokenizer, folder: Path, record: dict,
                     extra: Callable[[Path], None] | None = None) -> None:
    """Adapter + tokenizer + metrics.json (+ `extra` files), written to a temp folder and renamed into place, so a
    kill leaves no half-written iteration."""
    from recalign.runs import write_json

    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if extra is not None:
        extra(tmp)
    model.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp / "adapter")
    write_json(tmp / "metrics.json", record)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _load_state(work: Path, config: SPRecConfig) -> dict:
    """The iteration table so far; a state from a different config is an error rather than silently mixed."""
    path = work / STATE_FILE
    fingerprint = config.model_dump(mode="json", exclude=RESUMABLE_FIELDS)
    if not path.is_file():
        return {"config": fingerprint, "iterations": []}
    state = json.loads(path.read_text())
    if state.get("config") != fingerprint:
        raise ConfigError(f"{path}: written by a different SPRec config; use a fresh work folder")
    return state


def _write_state(work: Path, state: dict) -> None:
    from recalign.runs import write_json

    state["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(work / STATE_FILE, state)  # atomic: temp file + rename


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON record per line, written atomically."""
    from recalign.runs import write_atomic

    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


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


def _load_checkpoint(folder: Path, config: SPRecConfig):
    """The base model with the adapter saved in `folder`, trainable."""
    from recalign.llm.models import load_model

    return load_model(config.model, dtype="float32", adapter=folder / "adapter", trainable=True, seed=config.seed,
                      progress=False)


def _sft(model, tokenizer, rows: Rows, titles: list[str], settings: SFTSettings, config: SPRecConfig, scratch: Path,
         progress: bool):
    """Continue the LoRA adapter on prompt -> ground-truth answer (loss on the answer tokens only)."""
    from recalign.llm.train import train_sft

    examples = [{"prompt": p, "completion": _answer_text(titles[int(t)], config)}
                for p, t in zip(_prompts(tokenizer, rows, titles, config), rows.targets)]
    return train_sft(model, tokenizer, examples, settings.model_copy(update={"seed": config.seed}),
                     output_dir=scratch, progress=progress).model


def _generate(model, tokenizer, rows: Rows, titles: list[str], settings: GenerationSettings, config: SPRecConfig,
              progress: bool) -> list[str]:
    """Greedy answers for every row (`recalign.llm.generate`: length-sorted left-padded batches, KV cache on)."""
    from recalign.llm.generate import GenerationSettings as Decoding
    from recalign.llm.generate import generate

    answers = generate(model, tokenizer, _prompts(tokenizer, rows, titles, config),
                       Decoding(max_new_tokens=settings.max_new_tokens), batch_size=settings.batch_size,
                       progress=progress)
    return [a[0] for a in answers]


def _dpo(model, tokenizer, pairs: Pairs, titles: list[str], config: SPRecConfig, scratch: Path, progress: bool):
    """DPO on (prompt, ground truth, rejected); π_ref = the incoming adapter, frozen (TRL's "ref" adapter copy)."""
    from recalign.llm.dpo import train_dpo

    records = [{"prompt": p, "chosen": _answer_text(titles[int(t)], config), "rejected": _answer_text(r, config)}
               for p, t, r in zip(_prompts(tokenizer, pairs.rows, titles, config), pairs.rows.targets,
                                  pairs.rejected_titles)]
    settings = config.dpo.model_copy(update={"seed": config.seed})
    result = train_dpo(model, tokenizer, records, settings, output_dir=scratch, progress=progress)
    return result.model, result.summary()


# ---- report: one table of all variants per iteration, and NDCG@5 / DivRatio@5 over iterations ----------

TABLE_COLUMNS = ("hr@5", "ndcg@5", "div_ratio@5", "or_ratio@5", "mgu@5", "dgu@5", "avg_pop@5", "valid_ratio",
                 "pairs")


def iteration_table(summary: dict, columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """Markdown table: one row per (variant, iteration)."""
    head = "| variant | iteration | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for record in summary["iterations"]:
        cells = []
        for c in columns:
            value = record.get(c)
            cells.append("" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value)))
        lines.append(f"| {record['variant']} | {record['iteration']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(comparisons: list[dict]) -> str:
    """Markdown: per checkpoint and metric, the difference to SFT, its 95% paired bootstrap interval (read it for
    HR/NDCG) and the permutation-test p-value (valid for every metric)."""
    keys = list(comparisons[0]["bootstrap"]) if comparisons else []
    lines = ["| variant | iteration | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for r in comparisons:
        cells = [f"{r['bootstrap'][k]['diff']:+.4f} [{r['bootstrap'][k]['low']:+.4f}, {r['bootstrap'][k]['high']:+.4f}]"
                 f" p={r['permutation'][k]['p_value']:.3f}" for k in keys]
        lines.append(f"| {r['variant']} | {r['iteration']} | " + " | ".join(cells) + " |")
    return ("Difference to SFT on the same rows: diff [95% paired bootstrap interval] p = paired permutation test\n\n"
            + "\n".join(lines) + "\n")


def plot_iterations(summary: dict, path: str | Path, metrics: tuple[str, ...] = ("ndcg@5", "div_ratio@5")) -> Path:
    """PNG of each metric over iterations, one line per variant; every variant starts from the SFT model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = summary["iterations"]
    sft = next((r for r in records if r["variant"] == "sft"), None)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    for axis, metric in zip(np.atleast_1d(axes), metrics):
        for variant in ("dpo_random", "sprec"):
            points = sorted((r["iteration"], r[metric]) for r in records if r["variant"] == variant and metric in r)
            if sft is not None and points:
                points = [(0, sft[metric])] + points
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, marker="o", label={"dpo_random": "DPO (random negatives)", "sprec": "SPRec"}[variant])
        if sft is not None and metric in sft:
            axis.axhline(sft[metric], color="grey", linestyle="--", label="SFT")
        axis.set_xlabel("iteration")
        axis.set_title(metric.replace("_", " ").replace("div ratio", "DivRatio").upper().replace("DIVRATIO", "DivRatio"))
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out


# ---- the recipe stage ---------------------------------------------------------------------------------------

def _run_stage(ctx, params: SPRecConfig) -> dict:
    """Recipe stage "sprec": run the loop in a persistent work folder (resumable), then report into the stage."""
    from recalign.config import stable_hash
    from recalign.runs import write_atomic, write_json

    config = params if "seed" in params.model_fields_set else params.model_copy(update={"seed": ctx.seed})
    if ctx.split is None:
        raise ConfigError("the sprec stage needs a split")
    # The stage folder is rebuilt from scratch on every attempt; iterations live outside it so a kill resumes.
    key = stable_hash({"config": config.model_dump(mode="json", exclude=RESUMABLE_FIELDS),
                       "data": ctx.dataset.fingerprint(), "split": ctx.recipe.split.model_dump(mode="json")})
    work = ctx.run_dir / "work" / f"{ctx.stage.name if ctx.stage else 'sprec'}-{key}"
    summary = run_sprec(config, ctx.dataset, ctx.split, work, progress=ctx.progress, log=ctx.log)
    write_json(ctx.stage_dir / "iterations.json", summary["iterations"])
    write_atomic(ctx.stage_dir / "iterations.md", iteration_table(summary))
    plot_iterations(summary, ctx.stage_dir / "ndcg_divratio.png")
    if config.compare_resamples > 0 and len(summary["iterations"]) > 1:
        comparisons = compare_against_sft(config, ctx.dataset, ctx.split, work, n_resamples=config.compare_resamples,
                                          seed=config.seed)
        write_json(ctx.stage_dir / "comparison_vs_sft.json", comparisons)
        write_atomic(ctx.stage_dir / "comparison_vs_sft.md", comparison_table(comparisons))
    last = max(r["iteration"] for r in summary["iterations"])
    (ctx.stage_dir / "final").mkdir()
    for variant, record in summary["final"].items():
        source = work / "sft" if variant == "sft" else work / variant / f"iter_{record['iteration']}"
        shutil.copytree(source / "adapter", ctx.stage_dir / "final" / variant)
    metrics: dict = {"protocol": "sprec_rows", "iterations": last, "work_dir": str(work)}
    for variant, record in summary["final"].items():
        for name, value in record.items():
            if name not in ("variant", "iteration") and isinstance(value, (int, float)):
                metrics[f"{variant}/{name}"] = value
    if "sprec" in summary["final"]:  # the headline columns of `recalign report` read the SPRec model
        metrics.update({k: v for k, v in summary["final"]["sprec"].items() if "@" in k})
    return metrics


def _stage():
    from recalign.stages import Stage

    return Stage(params=SPRecConfig, run=_run_stage,
                 description="SPRec: SFT, then self-play DPO with the model's own grounded answers as negatives; "
                             "baselines SFT and DPO with random negatives")


SPREC_STAGE = _stage()
