"""TrackRec (arXiv 2508.15388; systems.md §2): a CoT generator G and a validator V aligned in turns.

The algorithm, as `run_trackrec` runs it (one chat template for every step: `recalign.methods.trackrec.prompts`):

    C₀ ← teacher(CoT prompt) for every train impression        an LLM (HF / OpenAI-compatible), or on a CPU the
                                                                deterministic STAND-IN summariser (not an LLM)
    G₀ ← SFT(G base + LoRA, CoT prompt → C₀)                   distillation (the loop starts from G₀, §2.4.7)
    V₀ ← V base (un-tuned)
    LLM test(G₀, V₀)                                           iteration 0
    for i = 1 .. N:
        (a) y_1..y_n ← sample(G_{i−1}, CoT prompt), seeded     n CoTs per train impression
        (b) s_k ← V_{i−1}: σ(log p_Yes − log p_No)              full next-token distribution (recalign.methods.trackrec.verifier)
        (c) r_k ← s_k if label = 1 else 1 − s_k
            drop impressions whose CoTs are ALL wrong (r_k ≤ ½ for every k), counted      (the original's filter
            chosen = argmax r; negatives = n_negatives of the rest, seeded                 dropped nothing, §2.4.4)
        (d) G_i ← S-DPO(G_{i−1}, π_ref = G_{i−1})              per-sample log-sum-exp (recalign.methods.trackrec.sdpo)
        (e) c ← greedy(G_i, CoT prompt)                        train and test impressions
        (f) V_i ← SFT(V base + a FRESH LoRA, V prompt(c) → Yes/No)    V re-initialised every iteration
        LLM test(G_i, V_i); commit iteration i                  a killed loop resumes after the last finished i

LLM test: G writes a greedy CoT per test impression, V answers; ACC counts an unparsable answer as wrong (the
valid ratio is reported, nothing is dropped, §2.4.8); AUC and LogLoss (scikit-learn) are computed on s.

Every checkpoint writes `cots.parquet` (user, item, label, part, prompt, cot: one row per impression) for the CTR
side (`recalign.methods.trackrec.ctr.knowledge` embeds prompt and CoT); `generate_cots` writes CoTs of a saved G for any impressions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.checkpoints import IterationStore
from recalign.errors import ConfigError
from recalign.llm.backends import GenerationBackend
from recalign.llm.train import SFTConfig
from recalign.llm.trainer import LoraConfig
from recalign.methods.trackrec.prompts import CtrSample
from recalign.methods.trackrec.sdpo import SDPOConfig
from recalign.stages import fill_seeds

__all__ = ["CoTTeacherConfig", "CoTDecodingConfig", "TrackRecConfig", "CtrRows", "TitleCatalog", "STAND_IN", "stand_in_cots",
           "Preferences", "build_preferences", "llm_test_metrics", "run_trackrec", "generate_cots",
           "TrackRecStageConfig", "TRACKREC_STAGE"]

STAND_IN = "stand-in"
STAND_IN_NAME = "stand-in summariser (deterministic, not an LLM)"
MARKER = "metrics.json"
RESUMABLE_FIELDS = {"iterations"}  # may grow between attempts on one work folder


# ---- configuration --------------------------------------------------------------------------------------------

class CoTTeacherConfig(BaseModel):
    """Who writes the distilled CoTs: the STAND-IN summariser (default on a CPU), an HF causal LM, or a server."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["stand-in", "hf", "openai"] = Field(
        STAND_IN, description="'stand-in': a deterministic summary of the history (liked/disliked titles, favourite "
                              "categories), NOT an LLM; 'hf': a causal LM; 'openai': an OpenAI-compatible server")
    model: str | None = Field(None, description="hf: HF id / folder / .gguf / 'smollm2'; openai: served model name")
    base_url: str | None = Field(None, description="openai: server URL, e.g. http://127.0.0.1:8000")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the API key")
    max_new_tokens: int = Field(256, ge=1, description="tokens per CoT (the prompt asks for <= 200 words)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")


class CoTDecodingConfig(BaseModel):
    """How G writes CoTs: sampled for preference data (temperature 1.0), greedy for the rest."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(128, ge=1, description="tokens per CoT (TrackRec: 512)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of step (a)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")


class TrackRecConfig(BaseModel):
    """Everything the LLM side of one TrackRec run depends on (defaults: a 2-core CPU budget)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("tiny", description="G's base model: HF id, folder, .gguf, 'smollm2' or 'tiny'")
    verifier_model: str | None = Field(None, description="V's base model (null = the same as `model`)")
    teacher: CoTTeacherConfig = Field(default_factory=CoTTeacherConfig, description="who writes the distilled CoTs")
    iterations: int = Field(3, ge=1, description="alternating iterations N (TrackRec: 3)")
    n_samples: int = Field(10, ge=2, description="CoTs sampled per train impression in step (a) (TrackRec: 10)")
    train_rows: int | None = Field(256, ge=1, description="seeded subsample of train impressions (null = all)")
    test_rows: int | None = Field(256, ge=1, description="seeded subsample of test impressions (null = all)")
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(r=8, alpha=16, dropout=0.05),
                               description="LoRA adapter of G and (fresh every iteration) of V")
    distill: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=1.0, learning_rate=2e-4, batch_size=4,
                                                                     max_length=1024),
                                 description="G's SFT on the teacher's CoTs (TrackRec: 1 epoch)")
    sdpo: SDPOConfig = Field(default_factory=lambda: SDPOConfig(learning_rate=5e-5),
                               description="G's S-DPO update (β 0.1, 2 negatives; TrackRec lr 1e-6 is full FT)")
    rec_tuning: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=3.0, learning_rate=2e-4,
                                                                        batch_size=8, max_length=1024),
                                    description="V's Rec-tuning SFT on Yes/No (TrackRec: 3 epochs)")
    decoding: CoTDecodingConfig = Field(default_factory=CoTDecodingConfig, description="G's CoT decoding")
    backend: GenerationBackend = Field(default_factory=GenerationBackend,
                                       description="engine of G's greedy CoTs (step e, train and test impressions): "
                                                   "transformers | vllm | openai | auto (recalign.llm.backends); the "
                                                   "sampled CoTs of step (a), S-DPO and V's scores always use "
                                                   "transformers")
    verifier_batch_size: int = Field(8, ge=1, description="V prompts per forward pass")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'")
    seed: int = Field(0, description="seed of the row samples, CoT sampling, negatives and training")


# ---- impressions and the catalog --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CtrRows:
    """Labelled impressions, aligned arrays (the fields of `recalign.methods.trackrec.ctr.data.Impressions` this method reads).

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
        """The fields this method reads of any impressions object (e.g. `recalign.methods.trackrec.ctr.data.Impressions`)."""
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


# ---- step 1: the teacher ---------------------------------------------------------------------------------------

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


def teacher_cots(settings: CoTTeacherConfig, rows: CtrRows, catalog: TitleCatalog, tokenizer, progress: bool) -> list[str]:
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


# ---- step 2 (c): preferences -----------------------------------------------------------------------------------

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


# ---- step 3: the LLM test ----------------------------------------------------------------------------------------

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


# ---- the loop ------------------------------------------------------------------------------------------------------

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
        say(f"step 1: distillation, teacher = {teacher_name(config.teacher)}")
        g, tokenizer = _load(config.model, config, lora=config.lora)
        cots = teacher_cots(config.teacher, train, catalog, tokenizer, progress)
        g = _sft(g, tokenizer, [_cot_prompt(tokenizer, s) for s in samples["train"]], cots, config.distill,
                 store.scratch, progress)
        greedy = {name: _greedy(g, tokenizer, samples[name], config, progress) for name in parts}
        v, v_tokenizer = _load(_verifier_base(config), config)
        metrics = _llm_test(v, v_tokenizer, samples["test"], greedy["test"], test.label, config)
        record = {"loop": "distill", "iteration": 0, "teacher": teacher_name(config.teacher), **metrics}
        store.commit(distilled, record, _writer(g, None, tokenizer, parts, samples, greedy,
                                                teacher={"train": cots}))
        del g, v

    for iteration in store.pending("align", config.iterations):
        if on_iteration_start is not None:
            on_iteration_start(iteration)
        say(f"step 2: alternating iteration {iteration}/{config.iterations}")
        previous = store.previous("align", iteration, distilled)
        g, tokenizer = _load(config.model, config, adapter=previous / "generator", trainable=True)
        v_adapter = previous / "verifier" if iteration > 1 else None  # V₀ is the un-tuned base model
        v, v_tokenizer = _load(_verifier_base(config), config, adapter=v_adapter)
        seed = config.seed + 1000 * iteration
        # (a) n sampled CoTs per train impression; (b) V scores each one
        sampled = _sample(g, tokenizer, samples["train"], config, seed, progress)
        scores = _scores(v, v_tokenizer, [s for s, row in zip(samples["train"], sampled) for _ in row],
                         [c for row in sampled for c in row], config).view(len(train), config.n_samples)
        del v
        # (c) rewards, the all-wrong filter, chosen and negatives; (d) S-DPO
        prefs = build_preferences(scores, train.label, config.sdpo.n_negatives, seed)
        sdpo_log: dict = {}
        if len(prefs.kept) == 0:
            say(f"iteration {iteration}: every impression's CoTs were all wrong; G is unchanged")
        else:
            g, sdpo_log = _sdpo(g, tokenizer, samples["train"], sampled, prefs, config, store.scratch, progress)
        # (e) greedy regeneration; (f) V re-initialised from its base and Rec-tuned on the new CoTs
        greedy = {name: _greedy(g, tokenizer, samples[name], config, progress) for name in parts}
        v, v_tokenizer = _load(_verifier_base(config), config, lora=config.lora, seed=seed)
        v = _sft(v, v_tokenizer, [_validator_prompt(v_tokenizer, s, c) for s, c in zip(samples["train"],
                                                                                       greedy["train"])],
                 [_yes_no(label) for label in train.label], config.rec_tuning, store.scratch, progress)
        metrics = _llm_test(v, v_tokenizer, samples["test"], greedy["test"], test.label, config)
        record = {"loop": "align", "iteration": iteration, **metrics, "preferences": len(prefs.kept),
                  "dropped_all_wrong": prefs.dropped_all_wrong, "reward_mean": float(prefs.rewards.mean()),
                  **sdpo_log}
        store.commit(store.folder("align", iteration), record,
                     _writer(g, v, tokenizer, parts, samples, greedy, sampled=sampled, prefs=prefs))
        del g, v
    store.clean_scratch()
    return {"iterations": sorted(store.records, key=lambda r: r["iteration"]), "work_dir": str(store.root)}


# ---- LLM blocks: one template for every step ---------------------------------------------------------------------

def _verifier_base(config: TrackRecConfig) -> str:
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


def _greedy(model, tokenizer, samples: list[CtrSample], config: TrackRecConfig, progress: bool) -> list[str]:
    from recalign.llm.backends import generate_answers
    from recalign.llm.generate import GenerationConfig

    prompts = [_cot_prompt(tokenizer, s) for s in samples]
    return [a[0].strip() for a in generate_answers(config.backend, model, tokenizer, prompts,
                                                   GenerationConfig(max_new_tokens=config.decoding.max_new_tokens),
                                                   batch_size=config.decoding.batch_size, progress=progress)]


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


def _llm_test(v, tokenizer, samples: list[CtrSample], cots: list[str], labels: np.ndarray,
              config: TrackRecConfig) -> dict:
    from recalign.methods.trackrec.verifier import verifier_scores

    prompts = [_validator_prompt(tokenizer, s, c) for s, c in zip(samples, cots)]
    out = verifier_scores(v, tokenizer, prompts, config.verifier_batch_size)
    return llm_test_metrics(labels, out.scores, out.answers)


def _sdpo(g, tokenizer, samples: list[CtrSample], sampled: list[list[str]], prefs: Preferences,
          config: TrackRecConfig, scratch: Path, progress: bool):
    from recalign.methods.trackrec.sdpo import train_sdpo

    records = [{"prompt": _cot_prompt(tokenizer, samples[row]), "chosen": sampled[row][chosen],
                "rejected": [sampled[row][j] for j in negatives]}
               for row, chosen, negatives in zip(prefs.kept.tolist(), prefs.chosen.tolist(),
                                                 prefs.negatives.tolist())]
    result = train_sdpo(g, tokenizer, records, config.sdpo, output_dir=scratch, progress=progress)
    return result.model, result.summary()


# ---- checkpoints and CoT files -----------------------------------------------------------------------------------

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
    return _greedy(g, tokenizer, catalog.samples(rows), config, progress)
