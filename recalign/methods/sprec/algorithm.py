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
            evaluate(θ); commit θ to <v>/iter_<i>/                    a killed loop resumes after the last i

Evaluation (metrics.md §2.3, protocol `sprec_rows`): greedy generation, the first quoted title is embedded and
the K nearest catalog titles are the top-K list; HR/NDCG@K, DivRatio@K, ORRatio@K, MGU@K, DGU@K and AvgPop@K.

Shared blocks: checkpoints, state and resume are `recalign.checkpoints.IterationStore`; SFT and DPO are
`recalign.llm.train` / `recalign.llm.dpo` over `recalign.llm.trainer`; tables, plots, the paired comparison with
SFT and the recipe stage (`SPREC_STAGE`) are in `recalign.methods.sprec.report`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.checkpoints import IterationStore
from recalign.errors import ConfigError
from recalign.eval import beyond
from recalign.llm.backends import GenerationBackend
from recalign.llm.dpo import DPOConfig
from recalign.llm.grounding import GroundingConfig
from recalign.llm.tasks import Rows, SeqRecTask, eval_rows, prompts_for, sample_rows
from recalign.llm.tasks import train_rows as task_train_rows
from recalign.llm.train import SFTConfig
from recalign.llm.trainer import LoraConfig
from recalign.stages import fill_seeds

VARIANTS = ("sft", "dpo_random", "sprec")
STATE_FILE = "state.json"
MARKER = "metrics.json"  # an iteration folder is finished when its record exists (written last, then renamed)
# may change between attempts on one work folder (the backend only runs evaluation, never the checkpoints)
RESUMABLE_FIELDS = {"variants", "iterations", "compare_resamples", "backend"}


# ---- configuration ------------------------------------------------------------------------------------

class SPRecGenerationConfig(BaseModel):
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
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=4.0, learning_rate=3e-4, batch_size=4,
                                                                 grad_accum=4, max_length=512),
                             description="stage-0 SFT (SPRec: 4 epochs, lr 3e-4, 4x4)")
    sft_step: SFTConfig | None = Field(
        default_factory=lambda: SFTConfig(epochs=1.0, learning_rate=2e-5, batch_size=4, grad_accum=4,
                                            max_length=512),
        description="per-iteration SFT on the positives before DPO (null = skip; SPRec: 1 epoch, lr 2e-5)")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="the DPO step (β = 0.1, lr 2e-5, 2×4)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter (r 16, α 32, dropout 0.05)")
    grounding: GroundingConfig = Field(default_factory=lambda: GroundingConfig(kind="embedding"),
                                       description="generated title -> catalog items (SPRec: embedding k-NN)")
    pair_generation: SPRecGenerationConfig = Field(default_factory=lambda: SPRecGenerationConfig(max_new_tokens=64),
                                                description="decoding of the self-play negatives")
    eval_generation: SPRecGenerationConfig = Field(default_factory=SPRecGenerationConfig,
                                                description="decoding at evaluation")
    backend: GenerationBackend = Field(default_factory=GenerationBackend,
                                       description="engine of the evaluation answers: transformers | vllm | openai | "
                                                   "auto (recalign.llm.backends); the self-play negatives, SFT and "
                                                   "DPO always use transformers")
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
              on_iteration_start: IterationHook | None = None, log: Callable[[str], None] | None = None,
              evaluator: Callable | None = None) -> dict:
    """Run SFT and every configured variant for `config.iterations` iterations, resuming from `work_dir`.

    Returns {"iterations": [{variant, iteration, metrics...}, ...], "final": {variant: metrics}}; the same table
    is kept in work_dir/state.json after every finished iteration (`recalign.checkpoints`).
    `evaluator` ((model, tokenizer) -> metrics, keeping `answers_`) replaces the `sprec_rows` evaluation, e.g. the
    recipe's evaluator on its users (`recalign.methods.llm_sft.stage.RecipeAnswers`).
    """
    from recalign.llm.grounding import make_grounder

    config = fill_seeds(config, config.seed)  # the one seed rule: sft/dpo seeds follow `seed` unless set
    store = IterationStore(work_dir, _fingerprint(config), marker=MARKER, state_file=STATE_FILE,
                           key_fields=("variant", "iteration"))
    say = log or (lambda message: None)
    titles = dataset.titles()
    grounder = make_grounder(config.grounding, titles)
    train = train_rows(dataset, split, config.max_history, config.train_users)
    if len(train) == 0:
        raise ConfigError("SPRec: no train rows (every user needs >= 2 train interactions)")
    config.backend.check(where="sprec backend")  # before any training
    evaluate = evaluator or _make_evaluator(config, dataset, split, grounder, progress)

    # Stage 0: θ₀ ← SFT(base + LoRA, train rows): the "sft" variant and iteration 0 of every variant.
    sft_dir = store.folder("sft")
    if not store.done(sft_dir):
        say("stage 0: SFT")
        model, tokenizer = _base_model(config)
        rows = sample_rows(train, config.sft_rows, config.seed)
        model = _sft(model, tokenizer, rows, titles, config.sft, config, store.scratch, progress)
        metrics = evaluate(model, tokenizer)
        store.commit(sft_dir, {"variant": "sft", "iteration": 0, **metrics},
                     _checkpoint_writer(model, tokenizer, evaluate.answers_))
        del model

    for variant in [v for v in config.variants if v != "sft"]:
        for iteration in store.pending(variant, config.iterations):  # finished iterations are never recomputed
            if on_iteration_start is not None:
                on_iteration_start(variant, iteration)
            say(f"{variant}: iteration {iteration}/{config.iterations}")
            model, tokenizer = _load_checkpoint(store.previous(variant, iteration, sft_dir), config)
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
                    model = _sft(model, tokenizer, pairs.rows, titles, config.sft_step, config, store.scratch,
                                 progress)
                model, dpo_log = _dpo(model, tokenizer, pairs, titles, config, store.scratch, progress)
            metrics = evaluate(model, tokenizer)
            record = {"variant": variant, "iteration": iteration, **metrics, **dpo_log,
                      "pairs": len(pairs), "dropped_equal": pairs.dropped_equal,
                      "dropped_ungrounded": pairs.dropped_ungrounded}
            store.commit(store.folder(variant, iteration), record,
                         _checkpoint_writer(model, tokenizer, evaluate.answers_, pairs, titles))
            del model
    store.clean_scratch()
    return _summary(store.records, config)


def _summary(records: list[dict], config: SPRecConfig) -> dict:
    """Rows sorted by (variant, iteration) and the last iteration of each variant."""
    rows = sorted(records, key=lambda r: (VARIANTS.index(r["variant"]), r["iteration"]))
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
                            self.config, self.progress, self.config.backend)
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
            return sprec_list_metrics(lists, torch.as_tensor(self.rows.targets), self.rows.histories, self.config.ks,
                                self.popularity, self.genre_weights, self.genres)
        chosen = torch.from_numpy(index)
        return sprec_list_metrics(lists[chosen], torch.as_tensor(self.rows.targets)[chosen],
                            [self.rows.histories[i] for i in index], self.config.ks, self.popularity,
                            self.genre_weights, self.genres)


def sprec_list_metrics(lists: torch.Tensor, targets: torch.Tensor, histories: list[list[int]], ks: list[int],
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


# ---- checkpoints and state --------------------------------------------------------------------------------

def _finished(folder: Path) -> bool:
    """A finished checkpoint folder (the iteration store's marker is written last)."""
    return (folder / MARKER).is_file()


def _fingerprint(config: SPRecConfig) -> dict:
    """What the stored iterations depend on: the config without the fields that may grow between attempts."""
    return config.model_dump(mode="json", exclude=RESUMABLE_FIELDS)


def _checkpoint_writer(model, tokenizer, answers: list[dict], pairs: "Pairs | None" = None,
                       titles: list[str] | None = None) -> Callable[[Path], None]:
    """What one checkpoint folder holds: the adapter (+ tokenizer), eval_answers.jsonl and, after DPO, pairs.jsonl."""
    def write(tmp: Path) -> None:
        if pairs is not None:
            _write_pairs(tmp / "pairs.jsonl", pairs, titles or [])
        _write_jsonl(tmp / "eval_answers.jsonl", answers)
        model.save_pretrained(tmp / "adapter")
        tokenizer.save_pretrained(tmp / "adapter")

    return write



def _write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON record per line, written atomically."""
    from recalign.io import write_atomic

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
    from recalign.llm.generate import SPRecGenerationConfig as Decoding

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
