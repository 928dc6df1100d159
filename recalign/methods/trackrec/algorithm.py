"""TrackRec (arXiv 2508.15388): a CoT generator G and a validator V aligned in turns (docs/systems/trackrec.md).

The paper's algorithm box, as `run_trackrec` runs it (one chat template for every step:
`recalign.methods.trackrec.prompts`). Input: train and test impressions (`CtrRows`), the catalog that names them
(`TitleCatalog`), N = `iterations`, n = `n_samples`.

     1. train, test ← seeded samples of `train_rows` / `test_rows` impressions             `CtrRows.sample`
     2. C₀ ← teacher(CoT prompt) for every train impression: an LLM (HF or                 `teacher_cots`
        OpenAI-compatible), or on a CPU the deterministic STAND-IN summariser (not an LLM) `stand_in_cots`
     3. G₀ ← SFT(G base + LoRA, CoT prompt → C₀)                                           `distill_generator`
     4. V₀ ← V base (un-tuned); LLM test(G₀, V₀); commit iteration 0                       `iteration_zero`
        (the loop starts from G₀; the original started from the base model: docs/systems/trackrec.md, defect 6)
     5. for i = 1 .. N, resuming after the last committed i:                               `alternating_iteration`
     6.   (a) y_1..y_n ← sample(G_{i−1}, CoT prompt), seeded, for every train impression   `sample_and_score`
     7.   (b) s_k ← V_{i−1}: σ(log p_Yes − log p_No) over the full next-token distribution
              (`recalign.methods.trackrec.verifier`)
     8.   (c) r_k ← s_k if label = 1 else 1 − s_k; drop impressions whose CoTs are ALL     `build_preferences`
              wrong (r_k ≤ ½ for every k), counted (the original's filter dropped nothing: defect 3);
              chosen = argmax r; negatives = `sdpo.n_negatives` of the rest, seeded
     9.   (d) G_i ← S-DPO(G_{i−1}, π_ref = G_{i−1}), per-sample log-sum-exp                `align_generator`
              (`recalign.methods.trackrec.sdpo`); G is kept when step (c) dropped every impression
    10.   (e) c ← greedy(G_i, CoT prompt) for train and test impressions                   `greedy_cots`
    11.   (f) V_i ← SFT(V base + a FRESH LoRA, V prompt(c) → Yes/No): V re-initialised     `rec_tune_validator`
    12.   LLM test(G_i, V_i); commit iteration i                                           `llm_test`
    Output: one record per iteration (0 = G₀ with the un-tuned V₀).

LLM test (`llm_test`, `llm_test_metrics`): G writes a greedy CoT per test impression, V answers; ACC counts an
unparsable answer as wrong (the valid ratio is reported, nothing is dropped: defect 7); AUC and LogLoss
(scikit-learn) are computed on s.

Every checkpoint writes `cots.parquet` (user, item, label, part, prompt, cot: one row per impression) for the CTR
side (`recalign.methods.trackrec.ctr.knowledge` embeds prompt and CoT); `generate_cots` writes CoTs of a saved G for
any impressions. Checkpoints, state and resume are `recalign.checkpoints.IterationStore`; settings:
`recalign.methods.trackrec.config`; the recipe stage (`TRACKREC_STAGE`): `recalign.methods.trackrec.stage`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recalign.checkpoints import IterationStore
from recalign.errors import ConfigError
from recalign.llm.train import SFTConfig
from recalign.llm.trainer import LoraConfig
from recalign.methods.trackrec.config import STAND_IN, CoTTeacherConfig, TrackRecConfig
from recalign.methods.trackrec.prompts import CtrSample
from recalign.stages import fill_seeds

__all__ = ["CtrRows", "TitleCatalog", "STAND_IN", "stand_in_cots", "teacher_cots", "teacher_name", "distill_generator",
           "iteration_zero", "alternating_iteration", "sample_and_score", "Preferences", "build_preferences",
           "align_generator", "greedy_cots", "rec_tune_validator", "llm_test", "llm_test_metrics", "run_trackrec",
           "generate_cots"]

STAND_IN_NAME = "stand-in summariser (deterministic, not an LLM)"
MARKER = "metrics.json"
RESUMABLE_FIELDS = {"iterations"}  # may grow between attempts on one work folder


# ---- impressions and the catalog -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CtrRows:
    """Labelled impressions, aligned arrays (the fields of `recalign.methods.trackrec.ctr.data.Impressions` that
    this method reads).

    history [N, H]: item ids rated before the impression, oldest first, -1 = padding; history_rating [N, H].
    """

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    history: np.ndarray
    history_rating: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def take(self, rows: np.ndarray) -> "CtrRows":
        """The impressions at row indices `rows`."""
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @classmethod
    def of(cls, impressions) -> "CtrRows":
        """The fields this method reads of any impressions object (e.g. `ctr.data.Impressions`)."""
        return cls(**{f.name: np.asarray(getattr(impressions, f.name)) for f in fields(cls)})

    def sample(self, count: int | None, seed: int) -> "CtrRows":
        """A seeded subsample of `count` rows in their original order (all rows when count is None or larger)."""
        if count is None or count >= len(self):
            return self
        return self.take(np.sort(np.random.default_rng(seed).choice(len(self), size=count, replace=False)))


@dataclass(frozen=True)
class TitleCatalog:
    """What the prompts name: item titles and categories by item id, user profiles by user id, the item noun."""

    titles: list[str]
    categories: list[list[str]]
    profiles: dict[int, dict[str, object]]
    noun: str = "movie"

    @classmethod
    def of(cls, dataset, noun: str = "movie", features: tuple[str, ...] = ("gender", "age", "occupation")
           ) -> "TitleCatalog":
        """Titles and categories of `dataset`, and its user table's profile features where present."""
        users = dataset.users
        present = [f for f in features if f in users.columns]
        profiles = {int(u): {f: row[f] for f in present} for u, row in zip(users["user_id"], users[present]
                                                                            .to_dict("records"))}
        return cls(dataset.titles(), dataset.item_categories(), profiles, noun)

    def samples(self, rows: CtrRows) -> list[CtrSample]:
        """The prompt view of every impression: profile, rated history (oldest first), candidate title."""
        out = []
        for user, item, history, ratings in zip(rows.user, rows.item, rows.history, rows.history_rating):
            rated = [(self.titles[int(h)], float(r)) for h, r in zip(history, ratings) if h >= 0]
            out.append(CtrSample(self.titles[int(item)], rated, self.profiles.get(int(user), {}), self.noun))
        return out


# ---- the loop --------------------------------------------------------------------------------------------------

IterationHook = Callable[[int], None]


def run_trackrec(config: TrackRecConfig, train: CtrRows, test: CtrRows, catalog: TitleCatalog, work_dir: str | Path, *,
                 progress: bool = False, log: Callable[[str], None] | None = None,
                 on_iteration_start: IterationHook | None = None) -> dict:
    """Distil G, then `config.iterations` alternating iterations, resuming from `work_dir`; returns the records."""
    config = fill_seeds(config, config.seed)
    config.backend.check(where="trackrec backend")  # before any training
    say = log or (lambda message: None)
    train, test = train.sample(config.train_rows, config.seed), test.sample(config.test_rows, config.seed + 1)
    if len(train) == 0 or len(test) == 0:
        raise ConfigError("TrackRec needs train and test impressions; got "
                          f"{len(train)} train and {len(test)} test")
    store = IterationStore(work_dir, config.model_dump(mode="json", exclude=RESUMABLE_FIELDS), marker=MARKER,
                           key_fields=("loop", "iteration"))
    parts = {"train": train, "test": test}
    samples = {name: catalog.samples(rows) for name, rows in parts.items()}

    distilled = store.folder("distill")
    if not store.done(distilled):
        iteration_zero(config, store, parts, samples, catalog, progress, say)

    for iteration in store.pending("align", config.iterations):
        if on_iteration_start is not None:
            on_iteration_start(iteration)
        alternating_iteration(config, store, iteration, distilled, parts, samples, progress, say)
    store.clean_scratch()
    return {"iterations": sorted(store.records, key=lambda r: r["iteration"]), "work_dir": str(store.root)}


def iteration_zero(config: TrackRecConfig, store: IterationStore, parts: dict[str, CtrRows],
                   samples: dict[str, list[CtrSample]], catalog: TitleCatalog, progress: bool,
                   say: Callable[[str], None]) -> None:
    """Steps 2-4: distil G₀ from the teacher's CoTs, LLM test with the un-tuned V₀, commit `<work>/distill`."""
    say(f"step 1: distillation, teacher = {teacher_name(config.teacher)}")
    g, tokenizer, cots = distill_generator(config, parts["train"], samples["train"], catalog, store.scratch, progress)
    greedy = {name: greedy_cots(g, tokenizer, samples[name], config, progress) for name in parts}
    v, v_tokenizer = _load(verifier_base(config), config)
    metrics = llm_test(v, v_tokenizer, samples["test"], greedy["test"], parts["test"].label, config)
    record = {"loop": "distill", "iteration": 0, "teacher": teacher_name(config.teacher), **metrics}
    store.commit(store.folder("distill"), record, _writer(g, None, tokenizer, parts, samples, greedy,
                                                          teacher={"train": cots}))


def alternating_iteration(config: TrackRecConfig, store: IterationStore, iteration: int, distilled: Path,
                          parts: dict[str, CtrRows], samples: dict[str, list[CtrSample]], progress: bool,
                          say: Callable[[str], None]) -> None:
    """Steps 6-12 for iteration i from G_{i−1}, V_{i−1} (the checkpoint before it, `distilled` for i = 1)."""
    train, test = parts["train"], parts["test"]
    say(f"step 2: alternating iteration {iteration}/{config.iterations}")
    previous = store.previous("align", iteration, distilled)
    g, tokenizer = _load(config.model, config, adapter=previous / "generator", trainable=True)
    v_adapter = previous / "verifier" if iteration > 1 else None  # V₀ is the un-tuned base model
    v, v_tokenizer = _load(verifier_base(config), config, adapter=v_adapter)
    seed = config.seed + 1000 * iteration
    # (a) n sampled CoTs per train impression; (b) V scores each one
    sampled, scores = sample_and_score(g, tokenizer, v, v_tokenizer, samples["train"], config, seed, progress)
    del v
    # (c) rewards, the all-wrong filter, chosen and negatives; (d) S-DPO
    prefs = build_preferences(scores, train.label, config.sdpo.n_negatives, seed)
    sdpo_log: dict = {}
    if len(prefs.kept) == 0:
        say(f"iteration {iteration}: every impression's CoTs were all wrong; G is unchanged")
    else:
        g, sdpo_log = align_generator(g, tokenizer, samples["train"], sampled, prefs, config, store.scratch, progress)
    # (e) greedy regeneration; (f) V re-initialised from its base and Rec-tuned on the new CoTs
    greedy = {name: greedy_cots(g, tokenizer, samples[name], config, progress) for name in parts}
    v, v_tokenizer = rec_tune_validator(config, samples["train"], greedy["train"], train.label, seed, store.scratch,
                                        progress)
    metrics = llm_test(v, v_tokenizer, samples["test"], greedy["test"], test.label, config)
    record = {"loop": "align", "iteration": iteration, **metrics, "preferences": len(prefs.kept),
              "dropped_all_wrong": prefs.dropped_all_wrong, "reward_mean": float(prefs.rewards.mean()),
              **sdpo_log}
    store.commit(store.folder("align", iteration), record,
                 _writer(g, v, tokenizer, parts, samples, greedy, sampled=sampled, prefs=prefs))


# ---- steps 2-3: the teacher and G₀ -----------------------------------------------------------------------------

def stand_in_cots(rows: CtrRows, catalog: TitleCatalog, top: int = 3) -> list[str]:
    """The STAND-IN teacher (not an LLM): liked (>= 4 stars) and disliked (<= 2) titles and favourite categories."""
    out = []
    for history, ratings in zip(rows.history, rows.history_rating):
        pairs = [(int(h), float(r)) for h, r in zip(history, ratings) if h >= 0]
        liked = [catalog.titles[h] for h, r in reversed(pairs) if r >= 4]
        disliked = [catalog.titles[h] for h, r in reversed(pairs) if r <= 2]
        counted = Counter(c for h, r in pairs if r >= 4 or not liked for c in catalog.categories[h])
        favourite = [c for c, _ in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
        parts = [f"The user enjoyed {_listing(liked)}." if liked else "The user enjoyed none of the recent "
                 f"{catalog.noun}s.",
                 f"The user disliked {_listing(disliked)}." if disliked else "",
                 f"Favourite categories: {', '.join(favourite)}." if favourite else ""]
        out.append(" ".join(p for p in parts if p))
    return out


def _listing(titles: list[str], most: int = 5) -> str:
    return ", ".join(f"'{t}'" for t in titles[:most])


def teacher_cots(settings: CoTTeacherConfig, rows: CtrRows, catalog: TitleCatalog, tokenizer,
                 progress: bool) -> list[str]:
    """The distilled CoTs: the stand-in summariser, an HF causal LM (its own chat template) or a server."""
    import os

    from recalign.llm.generate import GenerationConfig, generate
    from recalign.methods.trackrec.prompts import cot_messages, render

    if settings.kind == STAND_IN:
        return stand_in_cots(rows, catalog)
    if not settings.model:
        raise ConfigError(f"teacher.model: the '{settings.kind}' teacher needs a model")
    decoding = GenerationConfig(max_new_tokens=settings.max_new_tokens)
    samples = catalog.samples(rows)
    if settings.kind == "hf":
        from recalign.llm.models import load_model

        model, teacher_tokenizer = load_model(settings.model, dtype="float32", progress=progress)
        prompts = [render(teacher_tokenizer, cot_messages(s)) for s in samples]
        return [a[0] for a in generate(model, teacher_tokenizer, prompts, decoding, batch_size=settings.batch_size,
                                       progress=progress)]
    api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    prompts = [render(tokenizer, cot_messages(s)) for s in samples]  # G's template: the one TrackRec template
    return [a[0] for a in generate(settings.model, None, prompts, decoding, batch_size=settings.batch_size,
                                   backend="openai", base_url=settings.base_url, api_key=api_key,
                                   progress=progress)]


def teacher_name(settings: CoTTeacherConfig) -> str:
    """How the teacher is named in records and reports (the stand-in always says so)."""
    return STAND_IN_NAME if settings.kind == STAND_IN else f"{settings.kind}:{settings.model}"


def distill_generator(config: TrackRecConfig, rows: CtrRows, samples: list[CtrSample], catalog: TitleCatalog,
                      scratch: Path, progress: bool):
    """Steps 2-3: the teacher's CoTs C₀ for `rows`, and G₀ ← SFT(G base + LoRA, CoT prompt → C₀).

    Returns (G₀, its tokenizer, C₀).
    """
    g, tokenizer = _load(config.model, config, lora=config.lora)
    cots = teacher_cots(config.teacher, rows, catalog, tokenizer, progress)
    g = _sft(g, tokenizer, [_cot_prompt(tokenizer, s) for s in samples], cots, config.distill, scratch, progress)
    return g, tokenizer, cots


# ---- steps (a)-(b): sampled CoTs and their scores --------------------------------------------------------------

def sample_and_score(g, tokenizer, v, v_tokenizer, samples: list[CtrSample], config: TrackRecConfig, seed: int,
                     progress: bool) -> tuple[list[list[str]], torch.Tensor]:
    """Steps (a)-(b): `n_samples` CoTs of G per impression (seeded), and V's score s of each one [B, n]."""
    sampled = _sample(g, tokenizer, samples, config, seed, progress)
    scores = _scores(v, v_tokenizer, [s for s, row in zip(samples, sampled) for _ in row],
                     [c for row in sampled for c in row], config).view(len(samples), config.n_samples)
    return sampled, scores


# ---- step (c): preferences -------------------------------------------------------------------------------------

@dataclass
class Preferences:
    """Kept impressions (rows into the sampled batch), their chosen CoT and negatives, and the dropped count."""

    kept: np.ndarray          # [K] row indices of impressions with at least one right CoT
    chosen: np.ndarray        # [K] index of the chosen CoT among the n samples
    negatives: np.ndarray     # [K, k] indices of the sampled negatives
    rewards: torch.Tensor     # [B, n] all rewards
    dropped_all_wrong: int


def build_preferences(scores: torch.Tensor, labels: np.ndarray, n_negatives: int, seed: int) -> Preferences:
    """Rewards s or 1 − s by label; impressions whose CoTs are all wrong (every reward ≤ ½) are dropped."""
    label = torch.as_tensor(np.asarray(labels), dtype=torch.float32).unsqueeze(1)
    rewards = torch.where(label > 0.5, scores, 1.0 - scores)
    keep = (rewards > 0.5).any(dim=1)
    kept = torch.nonzero(keep).squeeze(1)
    if len(kept) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Preferences(empty, empty, np.zeros((0, n_negatives), dtype=np.int64), rewards, int((~keep).sum()))
    from recalign.methods.trackrec.sdpo import select_preferences

    chosen, negatives = select_preferences(rewards[kept], n_negatives, torch.Generator().manual_seed(seed))
    return Preferences(kept.numpy(), chosen.numpy(), negatives.numpy(), rewards, int((~keep).sum()))


# ---- steps (d)-(f): S-DPO, greedy regeneration, a fresh V ------------------------------------------------------

def align_generator(g, tokenizer, samples: list[CtrSample], sampled: list[list[str]], prefs: Preferences,
                    config: TrackRecConfig, scratch: Path, progress: bool):
    """Step (d): G_i ← S-DPO(G_{i−1}, π_ref = G_{i−1}) on the kept impressions; returns (G_i, the S-DPO summary)."""
    from recalign.methods.trackrec.sdpo import train_sdpo

    records = [{"prompt": _cot_prompt(tokenizer, samples[row]), "chosen": sampled[row][chosen],
                "rejected": [sampled[row][j] for j in negatives]}
               for row, chosen, negatives in zip(prefs.kept.tolist(), prefs.chosen.tolist(),
                                                 prefs.negatives.tolist())]
    result = train_sdpo(g, tokenizer, records, config.sdpo, output_dir=scratch, progress=progress)
    return result.model, result.summary()


def greedy_cots(model, tokenizer, samples: list[CtrSample], config: TrackRecConfig, progress: bool) -> list[str]:
    """Step (e): one greedy CoT of G per impression (on `config.backend`), stripped."""
    from recalign.llm.backends import generate_answers
    from recalign.llm.generate import GenerationConfig

    prompts = [_cot_prompt(tokenizer, s) for s in samples]
    return [a[0].strip() for a in generate_answers(config.backend, model, tokenizer, prompts,
                                                   GenerationConfig(max_new_tokens=config.decoding.max_new_tokens),
                                                   batch_size=config.decoding.batch_size, progress=progress)]


def rec_tune_validator(config: TrackRecConfig, samples: list[CtrSample], cots: list[str], labels: np.ndarray,
                       seed: int, scratch: Path, progress: bool):
    """Step (f): V_i ← SFT(V base + a fresh LoRA seeded by `seed`, V prompt(CoT) → Yes/No).

    V is re-initialised from its base every iteration; returns (V_i, its tokenizer).
    """
    v, v_tokenizer = _load(verifier_base(config), config, lora=config.lora, seed=seed)
    v = _sft(v, v_tokenizer, [_validator_prompt(v_tokenizer, s, c) for s, c in zip(samples, cots)],
             [_yes_no(label) for label in labels], config.rec_tuning, scratch, progress)
    return v, v_tokenizer


# ---- the LLM test ----------------------------------------------------------------------------------------------

def llm_test(v, tokenizer, samples: list[CtrSample], cots: list[str], labels: np.ndarray,
             config: TrackRecConfig) -> dict:
    """V's answers and scores on the test impressions with G's CoTs, and their metrics (`llm_test_metrics`)."""
    from recalign.methods.trackrec.verifier import verifier_scores

    prompts = [_validator_prompt(tokenizer, s, c) for s, c in zip(samples, cots)]
    out = verifier_scores(v, tokenizer, prompts, config.verifier_batch_size)
    return llm_test_metrics(labels, out.scores, out.answers)


def llm_test_metrics(labels: np.ndarray, scores: torch.Tensor | np.ndarray, answers: list[int | None]) -> dict:
    """ACC (an unparsable answer is wrong), AUC and LogLoss on s (scikit-learn), and the valid ratio."""
    from sklearn.metrics import log_loss, roc_auc_score

    y = np.asarray(labels).astype(int)
    s = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    right = [a is not None and a == t for a, t in zip(answers, y.tolist())]
    both = len(np.unique(y)) == 2
    return {"acc": float(np.mean(right)), "auc": float(roc_auc_score(y, s)) if both else None,
            "logloss": float(log_loss(y, s, labels=[0, 1])), "valid_ratio": sum(a is not None for a in answers)
            / len(answers), "n_test": len(y)}


# ---- LLM blocks: one template for every step -------------------------------------------------------------------

def verifier_base(config: TrackRecConfig) -> str:
    """V's base model: `verifier_model`, or G's `model` when it is not set."""
    return config.verifier_model or config.model


def _load(name: str, config: TrackRecConfig, *, lora: LoraConfig | None = None, adapter: Path | None = None,
          trainable: bool = False, seed: int | None = None):
    """A base model (float32), with a fresh LoRA adapter (initialised from `seed`), a saved one, or none.

    The base is always built with `config.seed` (it seeds the random "tiny" model's weights), so "re-initialised
    from its base" is the same base every time; only the fresh adapter's seed varies.
    """
    from recalign.llm.models import load_model
    from recalign.llm.trainer import attach_lora

    model, tokenizer = load_model(name, device=config.device, dtype="float32", adapter=adapter, trainable=trainable,
                                  seed=config.seed, progress=False)
    if lora is not None:
        model = attach_lora(model, lora, seed=config.seed if seed is None else seed)
        model.train(True)
    return model, tokenizer


def _cot_prompt(tokenizer, sample: CtrSample) -> str:
    from recalign.methods.trackrec.prompts import cot_messages, render

    return render(tokenizer, cot_messages(sample))


def _validator_prompt(tokenizer, sample: CtrSample, cot: str) -> str:
    from recalign.methods.trackrec.prompts import render, validator_messages

    return render(tokenizer, validator_messages(sample, cot))


def _yes_no(label: float) -> str:
    from recalign.methods.trackrec.prompts import validator_answer

    return validator_answer(int(label))


def _sft(model, tokenizer, prompts: list[str], completions: list[str], settings: SFTConfig, scratch: Path,
         progress: bool):
    from recalign.llm.train import train_sft

    examples = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    return train_sft(model, tokenizer, examples, settings, output_dir=scratch, progress=progress).model


def _sample(model, tokenizer, samples: list[CtrSample], config: TrackRecConfig, seed: int,
            progress: bool) -> list[list[str]]:
    from recalign.llm.generate import GenerationConfig, generate

    settings = GenerationConfig(max_new_tokens=config.decoding.max_new_tokens, do_sample=True,
                                  temperature=config.decoding.temperature, num_return_sequences=config.n_samples,
                                  seed=seed)
    answers = generate(model, tokenizer, [_cot_prompt(tokenizer, s) for s in samples], settings,
                       batch_size=config.decoding.batch_size, progress=progress)
    return [[a.strip() for a in row] for row in answers]


def _scores(model, tokenizer, samples: list[CtrSample], cots: list[str], config: TrackRecConfig) -> torch.Tensor:
    from recalign.methods.trackrec.verifier import verifier_scores

    prompts = [_validator_prompt(tokenizer, s, c) for s, c in zip(samples, cots)]
    return verifier_scores(model, tokenizer, prompts, config.verifier_batch_size).scores


# ---- checkpoints and CoT files ---------------------------------------------------------------------------------

def _cot_table(parts: dict[str, CtrRows], samples: dict[str, list[CtrSample]], cots: dict[str, list[str]]):
    """One row per impression: user, item, label, part, prompt (the CTR question text), cot."""
    import pandas as pd

    from recalign.methods.trackrec.prompts import ctr_messages

    frames = []
    for name, rows in parts.items():
        frames.append(pd.DataFrame({"user": rows.user.astype(np.int64), "item": rows.item.astype(np.int64),
                                    "label": rows.label.astype(np.int64), "part": name,
                                    "prompt": [ctr_messages(s)[-1]["content"] for s in samples[name]],
                                    "cot": cots[name]}))
    return pd.concat(frames, ignore_index=True)


def _writer(g, v, tokenizer, parts, samples, greedy, *, teacher: dict | None = None,
            sampled: list[list[str]] | None = None, prefs: Preferences | None = None) -> Callable[[Path], None]:
    """A checkpoint: G (and V) adapters, cots.parquet of G's greedy CoTs, the teacher's CoTs or the preferences."""
    def write(tmp: Path) -> None:
        g.save_pretrained(tmp / "generator")
        tokenizer.save_pretrained(tmp / "generator")
        if v is not None:
            v.save_pretrained(tmp / "verifier")
        _cot_table(parts, samples, greedy).to_parquet(tmp / "cots.parquet", index=False)
        if teacher is not None:  # the distilled CoTs, named after their teacher (the stand-in says so)
            _cot_table({"train": parts["train"]}, samples, teacher).to_parquet(tmp / "teacher_cots.parquet",
                                                                              index=False)
        if prefs is not None and sampled is not None:
            with open(tmp / "preferences.jsonl", "w", encoding="utf-8") as out:
                for row, chosen, negatives in zip(prefs.kept.tolist(), prefs.chosen.tolist(),
                                                  prefs.negatives.tolist()):
                    out.write(json.dumps({"row": row, "label": int(parts["train"].label[row]),
                                          "rewards": prefs.rewards[row].tolist(), "chosen": sampled[row][chosen],
                                          "rejected": [sampled[row][j] for j in negatives]}) + "\n")

    return write


def generate_cots(config: TrackRecConfig, checkpoint: str | Path, rows: CtrRows, catalog: TitleCatalog,
                  progress: bool = False) -> list[str]:
    """Greedy CoTs of the G saved in a checkpoint folder (`<work>/distill` or `<work>/align/iter_<i>`) for `rows`."""
    g, tokenizer = _load(config.model, config, adapter=Path(checkpoint) / "generator")
    return greedy_cots(g, tokenizer, catalog.samples(rows), config, progress)
