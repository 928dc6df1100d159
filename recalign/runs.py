"""Run folders: resolved config, dataset fingerprint, one folder per stage, resume, seeding, metrics and report.

Layout of a run folder:
    config.yaml            the resolved recipe (defaults filled in, overrides applied)
    dataset.json           fingerprint and counts of the dataset the stages saw
    data/                  the prepared dataset (when the recipe names a source), reused on re-runs
    stages/<name>/         each stage's artifacts + metrics.json + DONE (written last, via a temp folder rename)
    work/                  resumable state of long stages (SPRec iterations), kept across attempts
    candidates/            the sampled protocol's candidate lists (users, targets + negatives, seed), when used
    metrics.json           every finished stage's metrics
    log.txt  report.md  report.html   (report.html: the results, plots and settings as one self-contained page)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from recalign.checkpoints import stable_hash
from recalign.config import Recipe, StageConfig
from recalign.data.dataset import Dataset
from recalign.errors import FolderLockedError, OutputError, RecalignError, quoted, writing
from recalign.io import (
    LOCK_NAME,
    FolderBusyError,
    append_log,
    atomic_folder,
    folder_lock,
    read_json,
    unwritable_reason,
    write_atomic,
    write_json,
)
from recalign.methods import get_stage
from recalign.preparation import (
    absolute_data_paths,
    cache_is_fresh,
    make_split,
    prepare_data,
    prepare_key,
    save_prepared,
)
from recalign.processes import process_rank, world_size
from recalign.recipes import stage_dependencies
from recalign.stages import DONE, RunContext, fill_seeds, model_references_in, resolve_model_reference

if TYPE_CHECKING:
    from recalign.data.split import Split

# Eval settings that change how, not what, a stage is scored: changing them re-runs nothing.
EVAL_NOT_HASHED = {"table", "backend", "workers"}

# `recalign run --processes N` locks the run folder in the launching process and names it here for its rank 0
LOCK_HELD_ENV = "RECALIGN_LOCKED_RUN_DIR"
# A full or failing disk while stages run: reported naming the run folder; the finished stages stay
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


# ---- small helpers ------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global generators (components still take explicit seeds)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---- running a recipe -------------------------------------------------------------------------------

def stage_hashes(recipe: Recipe, data_fingerprint: str) -> dict[str, str]:
    """Per stage, a hash of what its result depends on: its kind and params, the recipe sections its kind reads
    (`Stage.reads`: data, split, eval without `table`, seed, other datasets) and the hashes of the earlier stages
    it depends on (`Stage.depends_on`), so retraining a teacher re-runs the stages built on it."""
    sections = {"data": data_fingerprint, "split": recipe.split.model_dump(mode="json"),
                "eval": recipe.eval.hashed(EVAL_NOT_HASHED), "seed": recipe.seed,
                "datasets": {role: [prepare_key(spec) if spec.source is not None else spec.model_dump(mode="json")
                                    for spec in specs] for role, specs in sorted(recipe.datasets.items())}}
    dependencies = stage_dependencies(recipe.stages)
    hashes: dict[str, str] = {}
    for stage in recipe.stages:
        reads = get_stage(stage.kind).reads
        deps = sorted(set(dependencies[stage.name].values()))
        hashes[stage.name] = stable_hash({**{key: sections[key] for key in reads}, "kind": stage.kind,
                                          "params": stage.params, "depends": {d: hashes[d] for d in deps}})
    return hashes


def stage_is_done(stage_dir: Path, config_hash: str) -> bool:
    """True when the stage finished with this exact config (its DONE marker holds the hash)."""
    marker = stage_dir / DONE
    if not marker.is_file():
        return False
    try:
        return read_json(marker).get("config_hash") == config_hash
    except (json.JSONDecodeError, AttributeError):
        return False


def run_recipe(recipe: Recipe, run_dir: str | os.PathLike, progress: bool = True,
               echo: Callable[[str], None] | None = None) -> dict:
    """Run every stage of a recipe in `run_dir`, skipping stages already finished with the same config.

    Returns {"recipe", "dataset", "stages": {name: metrics}}, also written to run_dir/metrics.json.
    The run folder is locked meanwhile (`lock_folder`): another command on it is refused, naming this one.
    Bad data leaves nothing behind; a full disk leaves the finished stages, for a re-run to resume from.
    """
    run_dir = Path(run_dir)
    if process_rank() > 0:  # under `accelerate launch`: only rank 0 writes the run folder
        return _follow_recipe(recipe, run_dir, get_stage)
    problem = unwritable_reason(run_dir)
    if problem is not None:  # refuse before preparing data or training anything
        raise OutputError(run_dir, problem)
    held = os.environ.get(LOCK_HELD_ENV) == str(run_dir.resolve())  # by the `--processes N` launcher
    with contextlib.nullcontext() if held else lock_folder(run_dir, "run"):
        return _run_locked(recipe, run_dir, progress, echo)


@contextlib.contextmanager
def lock_folder(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """`recalign.io.folder_lock` for the command `what` ("run", "data prepare"): a folder we cannot write, or one
    another live process holds, is refused with a RecalignError (the CLI's one line, naming the holder)."""
    folder = Path(folder)
    problem = unwritable_reason(folder)
    if problem is not None:
        raise OutputError(folder, problem)
    with contextlib.ExitStack() as stack:
        try:
            with writing(folder):
                stack.enter_context(folder_lock(folder, what))
        except FolderBusyError as exc:
            raise FolderLockedError(folder, exc.reason, exc.holder) from None
        yield folder


def _run_locked(recipe: Recipe, run_dir: Path, progress: bool, echo: Callable[[str], None] | None) -> dict:
    """`run_recipe` once the run folder is ours: data, split, the folder's files, every stage, summary, report."""
    from recalign.eval.html_report import write_html_report
    from recalign.eval.report import write_report

    fresh = _holds_nothing(run_dir)  # a new run folder: removed again if no stage finishes
    recipe = recipe.model_copy(update={"data": absolute_data_paths(recipe.data), "datasets": {
        role: [absolute_data_paths(spec) for spec in specs] for role, specs in recipe.datasets.items()}})
    results: dict[str, dict] = {}
    try:
        raw_dataset = prepare_data(recipe.data, cache_dir=run_dir / "data")
        dataset, split = make_split(raw_dataset, recipe.split, recipe.seed)
        with writing(run_dir):
            _start_run_folder(run_dir, recipe, raw_dataset, dataset, split)
        _mark_started(run_dir)
        append_log(run_dir, f"run {recipe.name}: dataset {dataset.name} ({dataset.fingerprint()}), {dataset.n_users} "
                            f"users, {dataset.n_items} items, {len(dataset.interactions)} interactions")
        _run_stages(recipe, run_dir, dataset, split, progress, echo, results)
        with _full_disk(run_dir, "writing the summary"):
            summary = _write_summary(run_dir, recipe, dataset.fingerprint(), results)
            write_report(run_dir)
            write_html_report(run_dir)  # the same run as one self-contained page, beside report.md
    except BaseException:
        _clear_started(run_dir)
        if fresh and not results:  # nothing finished, so nothing to resume: leave no folder behind
            _remove_contents(run_dir)
        raise
    _clear_started(run_dir)
    return summary


def _run_stages(recipe: Recipe, run_dir: Path, dataset: Dataset, split: "Split", progress: bool,
                echo: Callable[[str], None] | None, results: dict[str, dict]) -> None:
    """Run the stages not finished with their current config, adding each one's metrics to `results`."""
    fingerprint = dataset.fingerprint()
    hashes = stage_hashes(recipe, fingerprint)
    dependencies = stage_dependencies(recipe.stages)
    (run_dir / "stages").mkdir(exist_ok=True)
    for spec in recipe.stages:
        final = run_dir / "stages" / spec.name
        if stage_is_done(final, hashes[spec.name]):
            results[spec.name] = read_json(final / "metrics.json")
            append_log(run_dir, f"[{spec.name}] finished earlier with the same config: skipped")
            if echo is not None and progress:
                echo(f"[{spec.name}] finished earlier with the same config: skipped")
            continue
        with _full_disk(run_dir, f"in stage {quoted(spec.name)}"):
            results[spec.name] = _run_stage(spec, hashes[spec.name], run_dir, dataset, split, recipe, progress,
                                            echo, get_stage, _read_hashes(dependencies[spec.name], hashes))
            _write_summary(run_dir, recipe, fingerprint, results, with_claims=False)


@contextlib.contextmanager
def _full_disk(run_dir: Path, during: str) -> Iterator[None]:
    """A full (or failing) disk as an OutputError naming the run folder; the finished stages are kept."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        raise OutputError(run_dir, f"{exc.strerror or exc} {during}; the finished stages are kept: free some space, "
                                   "then re-run the same command to resume") from None


def _holds_nothing(folder: Path) -> bool:
    """True for a missing folder or one holding nothing but its lock file."""
    return not folder.is_dir() or all(entry.name == LOCK_NAME for entry in folder.iterdir())


def _remove_contents(folder: Path) -> None:
    """Remove everything in `folder` but its lock file (the lock removes the folder when it created it)."""
    for entry in list(folder.iterdir()) if folder.is_dir() else []:
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# ---- several processes (`accelerate launch`, `recalign run --processes N`) --------------------------------

# Stage kinds whose trainers run data-parallel in every process of a launch (TRL trainers, our PPO); every other
# kind (teachers, TRD, RecGPT) runs once, in rank 0, while the other ranks wait for its DONE marker.
RANKS = ".ranks"  # rank 0's "run folder ready" marker and the other ranks' private scratch run folders


def _launch_id() -> str:
    """Shared by the processes of one launch on one machine: their launcher's pid and the rendezvous port."""
    return f"{os.getppid()}-{os.environ.get('MASTER_PORT', '0')}"


def _mark_started(run_dir: Path) -> None:
    if world_size() > 1:
        write_atomic(run_dir / RANKS / f"{_launch_id()}.ready", "ready\n")


def _clear_started(run_dir: Path) -> None:
    if world_size() > 1:
        (run_dir / RANKS / f"{_launch_id()}.ready").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (run_dir / RANKS).rmdir()  # other ranks may still be removing their scratch folders


def _wait_for(condition: Callable[[], bool], poll_s: float = 0.5) -> None:
    """Poll until `condition()` holds (if rank 0 fails, the launcher ends every rank)."""
    while not condition():
        time.sleep(poll_s)


def _copy_work(source: Path, target: Path, stage: str, attempts: int = 3) -> None:
    """A private copy of the stage's folders in rank 0's work/ (work/<stage>-<key>: resumable iteration state);
    retried if rank 0 renames a file meanwhile."""
    for folder in sorted(source.glob(f"{stage}-*")) if source.is_dir() else []:
        for attempt in range(attempts):
            shutil.rmtree(target / folder.name, ignore_errors=True)
            try:
                shutil.copytree(folder, target / folder.name, symlinks=True)
                break
            except (shutil.Error, OSError):
                if attempt == attempts - 1:
                    raise


def _follow_recipe(recipe: Recipe, run_dir: Path, get_stage) -> dict:
    """A rank > 0: train the multi-process stages along with rank 0, in a private scratch run folder whose
    stages/ links to rank 0's finished stages and whose work/ starts as a copy of rank 0's (so both resume from the
    same iteration); skip the other stages; return rank 0's summary. Nothing it writes lands in the run folder
    (only rank 0 writes metrics, checkpoints, work/ and log.txt)."""
    run_dir = run_dir.resolve()
    _wait_for(lambda: (run_dir / RANKS / f"{_launch_id()}.ready").is_file())
    recipe = recipe.model_copy(update={"data": absolute_data_paths(recipe.data), "datasets": {
        role: [absolute_data_paths(spec) for spec in specs] for role, specs in recipe.datasets.items()}})
    dataset, split = make_split(prepare_data(recipe.data, cache_dir=run_dir / "data"), recipe.split, recipe.seed)
    hashes = stage_hashes(recipe, dataset.fingerprint())
    dependencies = stage_dependencies(recipe.stages)
    scratch = run_dir / RANKS / f"{_launch_id()}-rank{process_rank()}"
    (scratch / "stages").mkdir(parents=True, exist_ok=True)
    try:
        for spec in recipe.stages:
            final = run_dir / "stages" / spec.name
            if get_stage(spec.kind).multi_process and not stage_is_done(final, hashes[spec.name]):
                _copy_work(run_dir / "work", scratch / "work", spec.name)  # resume where rank 0 resumes
                _run_stage(spec, hashes[spec.name], scratch, dataset, split, recipe, False, None, get_stage,
                           _read_hashes(dependencies[spec.name], hashes))
                shutil.rmtree(scratch / "stages" / spec.name)
            _wait_for(lambda: stage_is_done(final, hashes[spec.name]))
            (scratch / "stages" / spec.name).symlink_to(final, target_is_directory=True)
        _wait_for(lambda: not (run_dir / RANKS / f"{_launch_id()}.ready").is_file())  # rank 0 wrote the summary
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            (run_dir / RANKS).rmdir()
    return read_json(run_dir / "metrics.json")


def _start_run_folder(run_dir: Path, recipe: Recipe, raw_dataset: Dataset, dataset: Dataset, split: "Split") -> None:
    """Create the run folder with its data cache, resolved config.yaml and dataset.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe.data.source is not None and not cache_is_fresh(recipe.data, run_dir / "data"):
        save_prepared(raw_dataset, recipe.data, run_dir / "data")
    write_atomic(run_dir / "config.yaml", recipe.to_yaml())
    write_json(run_dir / "dataset.json", {
        "fingerprint": dataset.fingerprint(), "name": dataset.name, "source": dataset.info.get("source"),
        "counts": {"users": dataset.n_users, "items": dataset.n_items, "interactions": len(dataset.interactions)},
        "split": {"kind": recipe.split.kind, "train": len(split.train), "valid": len(split.valid),
                  "test": len(split.test), **{k: len(v) for k, v in split.extra.items()}},
    })


def _read_hashes(declared: dict[str, str], hashes: dict[str, str]) -> dict[str, str]:
    """{earlier stage: its config hash} of the stages a stage reads (`declared`: params field -> stage name)."""
    return {name: hashes[name] for name in sorted(set(declared.values()))}


def _run_stage(spec: StageConfig, config_hash: str, run_dir: Path, dataset: Dataset, split: "Split",
               recipe: Recipe, progress: bool, echo: Callable[[str], None] | None, get_stage,
               depends: dict[str, str] | None = None) -> dict:
    """Run one stage in a temp folder and rename it into place when it succeeded (`depends`: the config hashes of
    the earlier stages it reads, which key its work folder)."""
    stage = get_stage(spec.kind)
    params = fill_seeds(stage.params.model_validate(spec.params), recipe.seed)  # no-op for a loaded recipe
    params = resolve_model_reference(params, run_dir)  # `model: stage:<name>` -> that stage's model folder
    final = run_dir / "stages" / spec.name
    with atomic_folder(final, fixed_tmp=True) as tmp:
        ctx = RunContext(run_dir=run_dir, stage_dir=tmp, dataset=dataset, split=split, seed=recipe.seed,
                         progress=progress, recipe=recipe, stage=spec, echo=echo, depends=dict(depends or {}))
        ctx.log(f"start ({spec.kind}, config {config_hash})")
        seed_everything(recipe.seed)
        started = time.perf_counter()
        try:
            metrics = stage.run(ctx, params)
        except BaseException as exc:
            ctx.log(f"failed: {type(exc).__name__}: {exc}")
            raise
        seconds = time.perf_counter() - started
        if not isinstance(metrics, dict):
            raise RecalignError(f"stage {spec.name!r} ({spec.kind}) returned {type(metrics).__name__}, not a dict")
        if isinstance(metrics.get("model"), str):  # a model an earlier stage saved: `stage:<name>`, not a path
            metrics["model"] = model_references_in(metrics["model"], run_dir)
        metrics = {"kind": spec.kind, **metrics, "stage_seconds": round(seconds, 3)}
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / DONE, {"config_hash": config_hash, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    ctx.log(f"done in {seconds:.1f}s")
    return read_json(final / "metrics.json")


def _write_summary(run_dir: Path, recipe: Recipe, fingerprint: str, results: dict[str, dict],
                   with_claims: bool = True) -> dict:
    """metrics.json: every finished stage's metrics and (`with_claims`, once the stages are done) the claims."""
    from recalign.eval.claims import check_claims

    summary = {"recipe": recipe.name, "dataset": fingerprint, "seed": recipe.seed, "stages": results}
    if recipe.claims and with_claims:  # each claim: a row against its baseline, paired bootstrap over the same users
        summary["claims"] = check_claims(run_dir, recipe.claims, seed=recipe.seed)
    write_json(run_dir / "metrics.json", summary)
    return summary


def load_run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """The resolved recipe stored in a run folder."""
    from recalign.recipes import load_recipe

    folder = Path(run_dir)
    if not folder.is_dir():
        raise RecalignError(f"{folder}: no such run folder")
    if not (folder / "config.yaml").is_file():
        raise RecalignError(f"{folder}: not a run folder (no config.yaml)")
    return load_recipe(folder / "config.yaml")


def open_run(run_dir: str | os.PathLike) -> tuple[Recipe, Dataset, "Split"]:
    """Recipe, dataset and split of an existing run folder (for re-evaluation)."""
    folder = Path(run_dir)
    recipe = load_run_recipe(folder)
    cache = folder / "data"
    if recipe.data.source is not None and (cache / "dataset.json").is_file():
        dataset = Dataset.load(cache)
    else:
        dataset = prepare_data(recipe.data)
    dataset, split = make_split(dataset, recipe.split, recipe.seed)
    return recipe, dataset, split


# ---- seed sweeps (`recalign run RECIPE --seeds 0,1,2`) ------------------------------------------------------

def seed_folder(parent: str | os.PathLike, seed: int) -> Path:
    """The run folder of one seed of a sweep: PARENT/seed-N."""
    return Path(parent) / f"seed-{seed}"


def sweep_recipes(recipe_yaml: str | os.PathLike, overrides: list[str], seeds: list[int]) -> dict[int, Recipe]:
    """The recipe once per seed, loaded with `seed=N` after the user's overrides: every seed the stages leave
    unset follows it (the one seed rule), everything else is equal. All are validated before anything runs."""
    from recalign.errors import ConfigError
    from recalign.recipes import load_recipe

    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct seeds, e.g. --seeds 0,1,2 (got {seeds})")
    base = load_recipe(recipe_yaml, overrides)
    if base.eval.users is not None and base.eval.users_seed is None:  # every seed scored on the same users
        overrides = [*overrides, f"eval.users_seed={base.seed}"]
    return {seed: load_recipe(recipe_yaml, [*overrides, f"seed={seed}"]) for seed in seeds}


def run_sweep(recipes: dict[int, Recipe], parent: str | os.PathLike, progress: bool = True,
              echo: Callable[[str], None] | None = None) -> dict[int, dict]:
    """Run each seed's recipe in its own run folder PARENT/seed-N, one after the other, and list them in
    PARENT/sweep.json (what `recalign compare PARENT` reads). Each seed resumes like any run: a finished seed's
    stages are all skipped, a killed sweep goes on where it stopped. PARENT is locked meanwhile.
    Returns {seed: the run's summary}."""
    from recalign.eval.compare import SWEEP_FILE

    parent = Path(parent)
    if (parent / "config.yaml").is_file() or (parent / "stages").is_dir():
        raise RecalignError(f"{parent}: a run folder, not a sweep folder; choose another --out for --seeds")
    summaries: dict[int, dict] = {}
    with lock_folder(parent, "run --seeds"):
        with writing(parent):
            write_json(parent / SWEEP_FILE, _sweep_summary(parent, recipes))
        try:
            for i, (seed, recipe) in enumerate(recipes.items(), 1):
                folder = seed_folder(parent, seed)
                if echo is not None:
                    echo(f"[seed {seed}] {i}/{len(recipes)}: {folder}")
                started = time.perf_counter()
                summaries[seed] = run_recipe(recipe, folder, progress, echo)
                if echo is not None:
                    echo(f"[seed {seed}] {i}/{len(recipes)} finished in {time.perf_counter() - started:.1f}s")
        except BaseException:
            if not any((seed_folder(parent, s) / "metrics.json").is_file() for s in _sweep_seeds(parent)):
                (parent / SWEEP_FILE).unlink(missing_ok=True)  # nothing to resume: leave no folder behind
            raise
    return summaries


def _sweep_seeds(parent: Path) -> list[int]:
    """The seeds an existing sweep.json lists (none when it is missing or unreadable)."""
    from recalign.eval.compare import SWEEP_FILE

    try:
        return [int(entry["seed"]) for entry in read_json(parent / SWEEP_FILE)["runs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _sweep_summary(parent: Path, recipes: dict[int, Recipe]) -> dict:
    """sweep.json: the recipe name and every seed folder, earlier sweeps' seeds into the same parent included."""
    seeds = sorted(set(_sweep_seeds(parent)) | set(recipes))
    name = next(iter(recipes.values())).name
    return {"recipe": name, "seeds": seeds,
            "runs": [{"seed": seed, "folder": seed_folder(".", seed).name} for seed in seeds]}
