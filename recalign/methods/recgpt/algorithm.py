"""RecGPT (HKUDS, arXiv 2506.06270): item text -> FSQ item codes -> a GPT decoder over codes, zero-shot on new domains.

The algorithm box, as `run_recgpt` executes it (docs/systems/recgpt.md, "The algorithm"):

    1. Item text. Sample every pre-training domain's user sequences of two or more items (a seeded subset of
       `pretrain.users` users; `pretrain_sequences`); a pre-training catalog is the items of those sequences, the
       target's catalog is all its items. Embed every catalog item's text (title, categories, description) once
       with a sentence encoder, MiniLM by default (`embed_items`, cached by model and text).
    2. Tokenizer. Fit the FSQ item tokenizer on the pre-training domains' embeddings; tokenise every catalog, the
       target's too: 4 FSQ codes + 1 disambiguating code, so every item's code is unique; the collision rate is
       reported (`tokenize_domains` -> `build_catalogs`). `tokenizer.kind: rq_kmeans` uses residual k-means codes
       instead (`levels` codes + 1 disambiguating code; rq_kmeans.py).
    3. Pre-training. One decoder on the user sequences of all pre-training domains, shuffled together: every code
       position of an item predicts the next item's code at that position, all at once (`pretrain_decoder`).
    4. Zero-shot. Recommend on the evaluation domain by trie-constrained beam search over its catalog's codes
       (`beam_recommender`), never having seen its interactions; scored by the `evaluate` callback once per
       history mode, history excluded and allowed (`score_decoder`). `beam.mode: exact` ranks the whole catalog by
       every item's summed code log-prob instead (`exact_recommender`); `both` scores the two (`score_inference`).
    5. Fine-tuning (optional, `finetune.epochs > 0`). A copy of the decoder trained further on the evaluation
       domain's training sequences (`finetune_decoder`), scored the same way.

Every step is a checkpoint in the work folder (`IterationStore`), so a killed run resumes: the tokenizer and codes,
each pre-training epoch, each fine-tuning epoch and each evaluation. The settings live in `config.py`; the recipe
stage (`stage.py`) only adapts a run folder to `run_recgpt`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from recalign.checkpoints import IterationStore, stable_hash
from recalign.data.dataset import Dataset
from recalign.errors import ConfigError, DataError
from recalign.methods.recgpt.codes import ItemCodes
from recalign.methods.recgpt.config import (
    RecGPTBeamConfig,
    RecGPTConfig,
    RecGPTDecoderConfig,
    RecGPTTrainingConfig,
)
from recalign.methods.recgpt.fsq import FSQConfig, ItemTokenizer
from recalign.methods.recgpt.rq_kmeans import RQKMeansConfig, RQKMeansTokenizer
from recalign.methods.recgpt.text import embed_texts, item_texts

if TYPE_CHECKING:
    from recalign.eval.lists import ListRecommender
    from recalign.methods.recgpt.decoder import RecGPTDecoder

__all__ = ["RecGPTConfig", "RecGPTBeamConfig", "RecGPTDecoderConfig", "RecGPTTrainingConfig", "RecGPTResult",
           "CodeCatalog", "Evaluate", "run_recgpt", "pretrain_sequences", "sample_sequences", "embed_items",
           "build_catalogs", "new_tokenizer", "tokenize_domains", "new_decoder", "joined", "pretrain_decoder",
           "finetune_decoder", "beam_recommender", "exact_recommender", "score_decoder", "score_inference",
           "evaluated", "indomain_decoder", "validator"]

# (recommender, exclude_history) -> the evaluator's metrics of its lists
Evaluate = Callable[["ListRecommender", bool], dict]


def _quiet(message: str) -> None:
    """The default `log`: drop the message."""


# ---- step 1-2: item text -> embeddings -> codes ----------------------------------------------------------

@dataclass
class CodeCatalog:
    """One domain as the decoder sees it: item text vectors [n, d] and unique item codes."""

    name: str
    vectors: torch.Tensor
    codes: ItemCodes
    items: np.ndarray  # dataset item ids of the catalog rows (all items, or the kept subset)


def sample_sequences(dataset: Dataset, interactions=None, users: int | None = None, seed: int = 0
                     ) -> list[np.ndarray]:
    """Time-ordered item sequences of every user (or a seeded subset of `users` of them) with >= 2 items."""
    sequences = dataset.sequences(interactions)
    eligible = np.flatnonzero(sequences.lengths() >= 2)
    if users is not None and users < len(eligible):
        eligible = np.sort(np.random.default_rng(seed).choice(eligible, size=users, replace=False))
    return [sequences[int(u)] for u in eligible]


def pretrain_sequences(datasets: Sequence[Dataset], users: int | None, seed: int
                       ) -> tuple[list[list[np.ndarray]], dict[str, tuple[Dataset, np.ndarray]]]:
    """Every pre-training domain's sequences (dataset i sampled with seed + i) and its catalog `pretrain-<i>`:
    (dataset, the item ids those sequences use, ascending); the sequences' items are renumbered to catalog rows."""
    sequences, domains = [], {}
    for i, ds in enumerate(datasets):
        seqs = sample_sequences(ds, users=users, seed=seed + i)
        if not seqs:
            raise DataError(f"datasets.pretrain[{i}] ({ds.name}): no user has two or more interactions")
        used = np.unique(np.concatenate(seqs))
        remap = np.full(ds.n_items, -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        sequences.append([remap[s] for s in seqs])
        domains[f"pretrain-{i}"] = (ds, used)
    return sequences, domains

def embed_items(dataset: Dataset, items: np.ndarray, params: "RecGPTConfig", progress: bool = False,
                encoder: Callable | None = None) -> torch.Tensor:
    """float32 text vectors [len(items), d] of the given item ids (cached by model and text)."""
    texts = item_texts(dataset.items.iloc[items])
    return torch.from_numpy(embed_texts(texts, params.text_model, encoder=encoder, progress=progress,
                                        max_tokens=params.text_max_tokens))


def new_tokenizer(params: RecGPTConfig, seed: int) -> "ItemTokenizer | RQKMeansTokenizer":
    """An unfitted item tokenizer of `params.tokenizer.kind`: FSQ (the default) or RQ-KMeans."""
    t = params.tokenizer
    if t.kind == "rq_kmeans":
        rq = t.rq_kmeans
        return RQKMeansTokenizer(RQKMeansConfig(levels=rq.levels, codebook_size=rq.codebook_size,
                                                iterations=rq.iterations, init=rq.init, balanced=rq.balanced,
                                                seed=seed))
    return ItemTokenizer(FSQConfig(levels=tuple(t.levels), n_chunks=t.n_chunks, hidden=t.hidden, epochs=t.epochs,
                                   batch_size=t.batch_size, lr=t.lr, seed=seed))


def build_catalogs(domains: dict[str, tuple[Dataset, np.ndarray]], fit_on: Sequence[str], params: RecGPTConfig,
                   seed: int, *, progress: bool = False, encoder: Callable | None = None
                   ) -> tuple["ItemTokenizer | RQKMeansTokenizer", dict[str, CodeCatalog]]:
    """Embed every domain's items, fit the tokenizer (`tokenizer.kind`) on the `fit_on` domains, tokenise them all.

    Every catalog's codes share one set of sizes (the disambiguating position as wide as the widest group), so
    one decoder reads them all.
    """
    vectors = {name: embed_items(ds, items, params, progress, encoder)
               for name, (ds, items) in domains.items()}
    tokenizer = new_tokenizer(params, seed).fit(torch.cat([vectors[name] for name in fit_on]))
    codes = {name: tokenizer.encode(v) for name, v in vectors.items()}
    n_positions = next(iter(codes.values())).n_positions
    sizes = tuple(max(c.sizes[p] for c in codes.values()) for p in range(n_positions))
    catalogs = {name: CodeCatalog(name, vectors[name], ItemCodes(c.codes, sizes, c.collision_rate), domains[name][1])
                for name, c in codes.items()}
    return tokenizer, catalogs


def tokenize_domains(domains: dict[str, tuple[Dataset, np.ndarray]], params: RecGPTConfig, seed: int,
                     store: IterationStore, *, progress: bool = False, log: Callable[[str], None] = _quiet
                     ) -> dict[str, CodeCatalog]:
    """Every domain's catalog: `build_catalogs` fitted on all domains but "target", kept as the checkpoint
    `tokenizer` (tokenizer, codes per domain, FSQ loss, collision rates); when it exists, codes are read back."""
    tokenizer_dir = store.folder("tokenizer")
    if store.done(tokenizer_dir):
        catalogs = {name: CodeCatalog(name, embed_items(ds, items, params, progress),
                                      ItemCodes.load(tokenizer_dir / f"codes-{name}.safetensors"), items)
                    for name, (ds, items) in domains.items()}
        log("tokenizer: resumed")
        return catalogs
    fit_on = [n for n in domains if n != "target"] or ["target"]  # in-domain: the target's own item texts
    tokenizer, catalogs = build_catalogs(domains, fit_on, params, seed, progress=progress)

    def write(tmp: Path) -> None:
        tokenizer.save(tmp / "tokenizer.safetensors")
        for name, catalog in catalogs.items():
            catalog.codes.save(tmp / f"codes-{name}.safetensors")

    loss_key = "rq_kmeans_residual" if params.tokenizer.kind == "rq_kmeans" else "fsq_loss"
    store.commit(tokenizer_dir, {"loop": "tokenizer", "iteration": 0, loss_key: tokenizer.history[-1],
                                 **{f"collision_rate_{n}": c.codes.collision_rate for n, c in catalogs.items()},
                                 "disambiguation_size": catalogs["target"].codes.sizes[-1]}, write)
    return catalogs

# ---- step 3-5: the decoder ---------------------------------------------------------------------------------

def new_decoder(catalog: CodeCatalog, params: RecGPTDecoderConfig, seed: int):
    """A freshly initialised decoder sized for the catalog's codes and text width (seeded)."""
    from recalign.methods.recgpt.decoder import DecoderConfig, RecGPTDecoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RecGPTDecoder(catalog.codes.sizes, catalog.vectors.shape[1], DecoderConfig(**params.model_dump()))


def joined(catalogs: Sequence[CodeCatalog], sequences: Sequence[Sequence[np.ndarray]]
           ) -> tuple[CodeCatalog, list[np.ndarray]]:
    """Several domains as one catalog (rows stacked) and their sequences with item ids shifted to match."""
    offsets = np.cumsum([0] + [len(c.items) for c in catalogs[:-1]])
    codes = ItemCodes(torch.cat([c.codes.codes for c in catalogs]), catalogs[0].codes.sizes)
    union = CodeCatalog("+".join(c.name for c in catalogs), torch.cat([c.vectors for c in catalogs]), codes,
                    np.concatenate([c.items for c in catalogs]))
    return union, [s + off for seqs, off in zip(sequences, offsets) for s in seqs]


def _train_epochs(decoder, catalog: CodeCatalog, sequences: list[np.ndarray], training: RecGPTTrainingConfig, seed: int,
                  store: IterationStore, loop: str, progress: bool, log: Callable[[str], None]):
    """Train epoch by epoch, each a checkpoint; finished epochs are loaded instead of retrained."""
    from safetensors.torch import load_file, save_file

    from recalign.methods.recgpt.training import DecoderTraining, train_decoder

    done = store.last_done(loop)
    if done:
        decoder.load_state_dict(load_file(str(store.folder(loop, done) / "decoder.safetensors")))
        log(f"{loop}: resumed after epoch {done}/{training.epochs}")
    for epoch in store.pending(loop, training.epochs, start=done + 1):
        settings = DecoderTraining(epochs=1, batch_size=training.batch_size, lr=training.lr,
                                   weight_decay=training.weight_decay, seed=seed + epoch, progress=progress)
        result = train_decoder(decoder, [s.tolist() for s in sequences], catalog.codes, catalog.vectors, settings)
        state = {k: v.contiguous() for k, v in decoder.state_dict().items()}
        store.commit(store.folder(loop, epoch), {"loop": loop, "iteration": epoch, "loss": result.epoch_losses[-1],
                                                 "seconds": round(result.seconds, 2), "sequences": len(sequences)},
                     lambda tmp: save_file(state, str(tmp / "decoder.safetensors")))
        log(f"{loop}: epoch {epoch}/{training.epochs} loss {result.epoch_losses[-1]:.4f} ({result.seconds:.0f}s)")
    decoder.eval()
    return decoder


def pretrain_decoder(catalogs: Sequence[CodeCatalog], sequences: Sequence[Sequence[np.ndarray]], params: RecGPTConfig,
                     seed: int, store: IterationStore, *, progress: bool = False,
                     log: Callable[[str], None] = lambda m: None):
    """One decoder trained on the sequences of every pre-training domain, shuffled together."""
    union, flat = joined(catalogs, sequences)
    decoder = new_decoder(union, params.decoder, seed)
    return _train_epochs(decoder, union, flat, params.pretrain, seed, store, "pretrain", progress, log)


def finetune_decoder(pretrained, catalog: CodeCatalog, sequences: Sequence[np.ndarray], params: RecGPTConfig,
                     seed: int, store: IterationStore, loop: str = "finetune", *, progress: bool = False,
                     log: Callable[[str], None] = lambda m: None):
    """A copy of the pre-trained decoder trained further on the target domain's training sequences."""
    decoder = new_decoder(catalog, params.decoder, seed)
    decoder.load_state_dict(pretrained.state_dict())
    return _train_epochs(decoder, catalog, list(sequences), params.finetune, seed, store, loop, progress, log)


def beam_recommender(decoder, catalog: CodeCatalog, beam: RecGPTBeamConfig, exclude_history: bool):
    """The decoder as a `ListRecommender` over the catalog: trie-constrained beam search."""
    from recalign.methods.recgpt.beam import BeamLists, CodeBeamConfig

    settings = CodeBeamConfig(widths=tuple(beam.widths), extensions=beam.extensions, exclude_history=exclude_history)
    return BeamLists(decoder, catalog.codes, catalog.vectors, settings, batch_size=beam.batch_size)


def exact_recommender(decoder, catalog: CodeCatalog, exclude_history: bool, beam: RecGPTBeamConfig | None = None):
    """The decoder as a `ListRecommender` over the catalog: exact full-catalog scoring (every item's summed code
    log-prob; `beam` gives the users per batch, default settings if None)."""
    from recalign.methods.recgpt.beam import CodeBeamConfig
    from recalign.methods.recgpt.exact import ExactLists

    beam = beam if beam is not None else RecGPTBeamConfig()
    settings = CodeBeamConfig(widths=tuple(beam.widths), extensions=beam.extensions, exclude_history=exclude_history)
    return ExactLists(decoder, catalog.codes, catalog.vectors, settings, batch_size=beam.batch_size)


def evaluated(store: IterationStore, name: str, evaluate: Callable[[], dict]) -> dict:
    """An evaluation result, computed once and kept as a checkpoint."""
    folder = store.folder(name)
    if store.done(folder):
        return store.record(folder)
    result = {"loop": name, "iteration": 0, **evaluate()}
    store.commit(folder, result)
    return result


def score_decoder(decoder, catalog: CodeCatalog, params: RecGPTConfig, store: IterationStore, variant: str,
                  evaluate: Evaluate, inference: str = "beam") -> dict[str, dict]:
    """The decoder's lists (`inference`: "beam" or "exact") scored once per history mode of `params.history`
    (each a checkpoint `eval-<variant>-history-<mode>`, `eval-<variant>-exact-history-<mode>` for exact lists):
    mode -> evaluator metrics."""
    out = {}
    for mode in params.history:
        excluded = mode == "excluded"
        if inference == "exact":
            name = f"eval-{variant}-exact-history-{mode}"
            make = lambda: exact_recommender(decoder, catalog, excluded, params.beam)  # noqa: E731
        else:
            name = f"eval-{variant}-history-{mode}"
            make = lambda: beam_recommender(decoder, catalog, params.beam, excluded)  # noqa: E731
        result = evaluated(store, name, lambda: evaluate(make(), excluded))
        out[mode] = {k: v for k, v in result.items() if k not in ("loop", "iteration")}
    return out


def score_inference(decoder, catalog: CodeCatalog, params: RecGPTConfig, store: IterationStore, variant: str,
                    evaluate: Evaluate) -> tuple[dict[str, dict], dict[str, dict] | None]:
    """`score_decoder` as `beam.mode` asks: (the lists' scores, the exact lists' scores when the mode is "both")."""
    mode = params.beam.mode
    main = score_decoder(decoder, catalog, params, store, variant, evaluate, "exact" if mode == "exact" else "beam")
    exact = score_decoder(decoder, catalog, params, store, variant, evaluate, "exact") if mode == "both" else None
    return main, exact


# ---- the whole algorithm -----------------------------------------------------------------------------------

@dataclass
class RecGPTResult:
    """What `run_recgpt` produced: catalogs, decoders, the scores per history mode and the checkpoint records."""

    catalogs: dict[str, CodeCatalog]  # "pretrain-<i>" per pre-training domain, then "target"
    pretrain_sequences: int  # user sequences pre-trained on, all domains together
    decoder: "RecGPTDecoder"  # the pre-trained decoder
    zero_shot: dict[str, dict]  # history mode -> evaluator metrics of the pre-trained decoder (step 4)
    finetuned: dict[str, dict] | None = None  # the same for the fine-tuned decoder (step 5; None: skipped)
    finetuned_decoder: "RecGPTDecoder | None" = None
    records: list[dict] = field(default_factory=list)  # every checkpoint record, in commit order
    zero_shot_exact: dict[str, dict] | None = None  # exact lists' metrics beside the beam's (beam.mode "both")
    finetuned_exact: dict[str, dict] | None = None
    protocol: str = "zero_shot"  # in_domain: `zero_shot`/`zero_shot_exact` hold the in-domain decoder's scores
    in_domain: dict | None = None  # in-domain training record: curve, best epoch, seconds (protocol in_domain)

    @property
    def target(self) -> CodeCatalog:
        """The evaluation domain's catalog."""
        return self.catalogs["target"]

    @property
    def pretrain_catalogs(self) -> list[CodeCatalog]:
        """The pre-training domains' catalogs, in dataset order."""
        n = sum(name.startswith("pretrain-") for name in self.catalogs)
        return [self.catalogs[f"pretrain-{i}"] for i in range(n)]


def run_recgpt(config: RecGPTConfig, eval_domain: Dataset, pretrain_domains: Sequence[Dataset],
               work_dir: str | Path, *, evaluate: Evaluate, train_interactions: pd.DataFrame | None = None,
               seed: int = 0, fingerprint: Any = None, progress: bool = False,
               log: Callable[[str], None] = _quiet, validate: Evaluate | None = None) -> RecGPTResult:
    """RecGPT end to end (the module's steps 1-5): pre-train on `pretrain_domains`, score on `eval_domain`.

    `evaluate(recommender, exclude_history)` scores a `ListRecommender` on the evaluation domain's users;
    `train_interactions` is its training part, read only by fine-tuning (needed when `finetune.epochs > 0`).
    `seed` applies unless `config.seed` is set. Checkpoints go to `work_dir`, whose state must match
    `fingerprint` (default: a hash of the config, the datasets and the seed). With `protocol: in_domain` the
    pre-training domains are not read (`run_indomain`); `validate` then scores lists on the validation part.
    """
    if (config.finetune.epochs > 0 or config.protocol == "in_domain") and train_interactions is None:
        raise ConfigError("recgpt: fine-tuning (finetune.epochs > 0) and protocol in_domain need the evaluation "
                          "domain's train_interactions")
    seed = int(config.seed if config.seed is not None else seed)
    if fingerprint is None:
        fingerprint = stable_hash({"params": config.fingerprint_dump(), "data": eval_domain.fingerprint(),
                                   "pretrain": [d.fingerprint() for d in pretrain_domains], "seed": seed})
    store = IterationStore(work_dir, fingerprint)
    if config.protocol == "in_domain":
        return run_indomain(config, eval_domain, store, evaluate=evaluate, validate=validate,
                            train_interactions=train_interactions, seed=seed, progress=progress, log=log)

    # 1-2. sequences, item text embeddings, tokenizer and codes (pre-training catalogs keep their users' items)
    sequences, domains = pretrain_sequences(pretrain_domains, config.pretrain.users, seed)
    domains["target"] = (eval_domain, np.arange(eval_domain.n_items))
    catalogs = tokenize_domains(domains, config, seed, store, progress=progress, log=log)
    log(f"codes: target collision rate {catalogs['target'].codes.collision_rate:.4f}, "
        f"{sum(len(s) for s in sequences)} pre-training sequences")

    # 3. pre-training on every pretrain domain
    pre = [catalogs[f"pretrain-{i}"] for i in range(len(pretrain_domains))]
    decoder = pretrain_decoder(pre, sequences, config, seed, store, progress=progress, log=log)

    # 4. zero-shot on the target
    zero, zero_exact = score_inference(decoder, catalogs["target"], config, store, "zeroshot", evaluate)

    # 5. fine-tuned on its training part
    tuned = tuned_scores = tuned_exact = None
    if config.finetune.epochs > 0:
        target_seqs = sample_sequences(eval_domain, train_interactions, config.finetune.users, seed)
        tuned = finetune_decoder(decoder, catalogs["target"], target_seqs, config, seed, store,
                                 progress=progress, log=log)
        tuned_scores, tuned_exact = score_inference(tuned, catalogs["target"], config, store, "finetuned", evaluate)
    return RecGPTResult(catalogs, sum(len(s) for s in sequences), decoder, zero, tuned_scores, tuned, store.records,
                        zero_shot_exact=zero_exact, finetuned_exact=tuned_exact)


# ---- protocol in_domain: tokenizer and decoder on the target alone -----------------------------------------------

def validator(catalog: CodeCatalog, params: RecGPTConfig, validate: Evaluate) -> Callable[..., dict]:
    """decoder -> validation metrics of its lists (`in_domain.valid_inference`, headline history mode)."""
    excluded = params.history[0] == "excluded"

    def check(decoder) -> dict:
        if params.in_domain.valid_inference == "exact":
            return validate(exact_recommender(decoder, catalog, excluded, params.beam), excluded)
        return validate(beam_recommender(decoder, catalog, params.beam, excluded), excluded)
    return check


def indomain_decoder(catalog: CodeCatalog, sequences: Sequence[np.ndarray], params: RecGPTConfig, seed: int,
                     store: IterationStore, check: Callable[..., dict], *, start=None, loop: str = "indomain",
                     progress: bool = False, log: Callable[[str], None] = _quiet):
    """A decoder trained on the target's sequences until validation stops improving: fresh (in-domain), or a copy
    of `start` (a pre-trained decoder: fine-tuning to convergence). One AdamW for all epochs, `check(decoder)` after
    each, stopped by `EarlyStopping` (best state kept) or by `in_domain.max_seconds`. One checkpoint `loop`
    (decoder, curve) when done; a killed run restarts this step. Returns (decoder, record: curve, best epoch,
    seconds)."""
    from safetensors.torch import load_file, save_file

    from recalign.eval.curves import CurveLog, write_curves
    from recalign.methods.recgpt.training import DecoderTraining, train_decoder
    from recalign.training import EarlyStopping

    cfg, decoder = params.in_domain, new_decoder(catalog, params.decoder, seed)
    if start is not None:
        decoder.load_state_dict(start.state_dict())
    folder = store.folder(loop)
    if store.done(folder):
        decoder.load_state_dict(load_file(str(folder / "decoder.safetensors")))
        log(f"{loop}: resumed")
        return decoder.eval(), store.record(folder)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopper, curve, rows = EarlyStopping(cfg.patience), CurveLog(cfg.valid_metric), [s.tolist() for s in sequences]
    if start is not None:  # epoch 0 is the pre-trained start: fine-tuning never keeps a worse state than it
        with torch.no_grad():
            stopper.update(float(check(decoder)[cfg.valid_metric]), 0, decoder.state_dict())
        log(f"{loop}: epoch 0 (pre-trained start) valid {cfg.valid_metric} {stopper.best:.4f}")
    started = time.perf_counter()
    for epoch in range(1, cfg.max_epochs + 1):
        settings = DecoderTraining(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   seed=seed + epoch, progress=progress, length_grouped=cfg.length_grouped,
                                   sparse_logits=cfg.sparse_logits)
        trained = train_decoder(decoder, rows, catalog.codes, catalog.vectors, settings, optimizer)
        with torch.no_grad():
            value = float(check(decoder)[cfg.valid_metric])
        row = curve.add(epoch, trained.epoch_losses[-1], value)
        row["train_seconds"] = round(trained.seconds, 2)
        log(f"{loop}: epoch {epoch} loss {row['loss']:.4f} valid {cfg.valid_metric} {value:.4f} "
            f"({trained.seconds:.0f}s train, {row['seconds']:.0f}s with validation)")
        if stopper.update(value, epoch, decoder.state_dict()) or (
                cfg.max_seconds is not None and time.perf_counter() - started > cfg.max_seconds):
            break
    decoder.load_state_dict(stopper.best_state)
    record = {"loop": loop, "iteration": 0, "best_epoch": stopper.best_epoch, "best_valid": stopper.best,
              "valid_metric": cfg.valid_metric, "epochs": len(curve.rows), "sequences": len(rows),
              "train_seconds": round(sum(r["train_seconds"] for r in curve.rows), 2), "curve": curve.rows}
    state = {k: v.contiguous() for k, v in decoder.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "decoder.safetensors"))
        write_curves(curve.rows, tmp / "curves.jsonl")
    store.commit(folder, record, write)
    return decoder.eval(), record


def run_indomain(config: RecGPTConfig, eval_domain: Dataset, store: IterationStore, *, evaluate: Evaluate,
                 validate: Evaluate | None, train_interactions: pd.DataFrame, seed: int, progress: bool = False,
                 log: Callable[[str], None] = _quiet) -> RecGPTResult:
    """Protocol in_domain: the tokenizer fitted on the target's item texts, the decoder trained on its training
    sequences and early-stopped on `validate`, then scored by `evaluate` as `run_recgpt` scores zero-shot."""
    if validate is None:
        raise ConfigError("recgpt: protocol in_domain needs a validation callback (the split's valid part)")
    catalogs = tokenize_domains({"target": (eval_domain, np.arange(eval_domain.n_items))}, config, seed, store,
                                progress=progress, log=log)
    catalog = catalogs["target"]
    log(f"codes: target collision rate {catalog.codes.collision_rate:.4f}")
    sequences = sample_sequences(eval_domain, train_interactions, config.in_domain.users, seed)
    decoder, record = indomain_decoder(catalog, sequences, config, seed, store, validator(catalog, config, validate),
                                       progress=progress, log=log)
    scores, exact = score_inference(decoder, catalog, config, store, "indomain", evaluate)
    return RecGPTResult(catalogs, 0, decoder, scores, records=store.records, zero_shot_exact=exact,
                        protocol="in_domain", in_domain=record)
