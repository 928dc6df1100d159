"""The contract between a run and a method: what a stage kind is (`Stage`), what it sees (`RunContext`), and
the one seed rule (`fill_seeds`: the recipe seed fills every seed a stage's params leave unset; explicit wins).

The table of stage kinds is `recalign.methods.STAGE_KINDS`; a run folder is built by `recalign.runs`.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from pydantic import BaseModel

from recalign.checkpoints import stable_hash
from recalign.config import Recipe, StageConfig
from recalign.data.dataset import Dataset
from recalign.errors import ConfigError
from recalign.io import append_log
from recalign.preparation import prepare_cached
from recalign.teachers.registry import load_teacher_dir

if TYPE_CHECKING:
    from recalign.data.split import Split
    from recalign.eval.lists import ListRecommender
    from recalign.teachers.base import Recommender

DONE = "DONE"  # written last into a finished stage's folder

# What a stage's result may depend on at recipe level; its hash covers only the sections its kind reads.
RECIPE_SECTIONS = frozenset({"data", "split", "eval", "seed", "datasets"})
DEFAULT_READS = frozenset({"data", "split", "eval", "seed"})


def no_dependencies(params: BaseModel, stage_names: Sequence[str]) -> dict[str, str]:
    """A stage kind that never reads another stage's output."""
    return {}


@dataclass(frozen=True)
class Stage:
    """One kind of recipe stage: its params schema (extra keys forbidden) and the function that runs it.

    `run(ctx, params)` trains/evaluates, writes artifacts under `ctx.stage_dir`, and returns a flat
    metrics dict (floats, plus a few descriptive strings/ints) that ends up in the run's metrics.json.
    `depends_on(params, stage_names)` -> {params field: earlier stage name} for every stage whose output it reads.
    `reads`: the recipe sections (of RECIPE_SECTIONS) its result depends on; only they enter its config hash.
    `multi_process`: whether every process of `recalign run --processes N` runs it (LLM training), or rank 0 alone.
    """

    params: type[BaseModel]
    run: Callable[["RunContext", BaseModel], dict]
    description: str = ""
    depends_on: Callable[[BaseModel, Sequence[str]], dict[str, str]] = no_dependencies
    reads: frozenset[str] = DEFAULT_READS
    multi_process: bool = False  # trains data-parallel under `recalign run --processes N` (else rank 0 runs it)

    def __post_init__(self) -> None:
        unknown = set(self.reads) - RECIPE_SECTIONS
        if unknown:
            raise ValueError(f"Stage.reads: unknown recipe sections {sorted(unknown)}; known: {sorted(RECIPE_SECTIONS)}")


# ---- model references ------------------------------------------------------------------------------

MODEL_REFERENCE = "stage:"  # `model: stage:toy-lm` = the model an earlier stage saved under <stage>/model


def model_reference(params: BaseModel) -> str | None:
    """The earlier stage a params' `model: stage:<name>` names, or None (a plain model name or no model field)."""
    model = getattr(params, "model", None)
    if isinstance(model, str) and model.startswith(MODEL_REFERENCE):
        return model[len(MODEL_REFERENCE):]
    return None


def resolve_model_reference(params: BaseModel, run_dir: Path) -> BaseModel:
    """`params` with `model: stage:<name>` replaced by that stage's saved model folder (run/stages/<name>/model);
    other params unchanged. A missing folder is a ConfigError naming the stage."""
    if model_reference(params) is None:
        return params
    return params.model_copy(update={"model": resolve_model_name(params.model, run_dir)})


def model_references_in(text: str, run_dir: Path) -> str:
    """`text` with every `<run>/stages/<name>/model` folder written back as `stage:<name>` (for tables)."""
    import re

    stages = re.escape(str((run_dir / "stages").resolve()))
    return re.sub(stages + r"[/\\]([^/\\\s,]+)[/\\]model", lambda m: MODEL_REFERENCE + m.group(1), text)


def resolve_model_name(model: str, run_dir: Path) -> str:
    """`stage:<name>` -> that stage's saved model folder (absolute); any other model name unchanged."""
    if not model.startswith(MODEL_REFERENCE):
        return model
    name = model[len(MODEL_REFERENCE):]
    folder = run_dir / "stages" / name / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model: {MODEL_REFERENCE}{name}: stage {name!r} saved no model at {folder}")
    return str(folder.resolve())


# ---- the seed rule ----------------------------------------------------------------------------------

def is_seed_field(name: str) -> bool:
    """Fields the recipe seed fills: `seed` and `*_seed` (e.g. `candidate_seed`)."""
    return name == "seed" or name.endswith("_seed")


def _takes_int(annotation: object) -> bool:
    if annotation is int:
        return True
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and int in typing.get_args(annotation)


def seed_fields(model: BaseModel, prefix: str = "") -> dict[str, int | None]:
    """Every seed field of a params model, nested models included: {dotted path: value}."""
    found: dict[str, int | None] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            found.update(seed_fields(value, f"{prefix}{name}."))
        elif is_seed_field(name) and _takes_int(info.annotation):
            found[prefix + name] = value
    return found


def fill_seeds(model: BaseModel, seed: int) -> BaseModel:
    """The one seed rule: every seed field the params left unset (not given, or null) becomes `seed`.

    Explicit values win. Nested settings models (e.g. `dqn`, `sft`, `generation`) are filled the same way, from
    the nearest explicit `seed` around them (a stage's own `seed: 5` seeds its `sft` too), else from `seed`.
    """
    own = getattr(model, "seed", None) if "seed" in model.model_fields_set else None
    inner = own if isinstance(own, int) else seed
    updates: dict[str, object] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            filled = fill_seeds(value, inner)
            if filled is not value:
                updates[name] = filled
        elif is_seed_field(name) and _takes_int(info.annotation) \
                and (name not in model.model_fields_set or value is None):
            updates[name] = seed
    return model.model_copy(update=updates) if updates else model


# ---- the context a stage runs in --------------------------------------------------------------------

@dataclass
class RunContext:
    """What a stage sees: its folder, the dataset and split, the seed, the recipe, and earlier stages' outputs."""

    run_dir: Path
    stage_dir: Path
    dataset: Dataset
    split: "Split | None"
    seed: int
    progress: bool
    recipe: Recipe
    stage: StageConfig | None = None
    echo: Callable[[str], None] | None = field(default=None, repr=False)
    depends: dict[str, str] = field(default_factory=dict)  # earlier stage it reads -> that stage's config hash
    keep_lists: bool = True  # evaluate() keeps the users' lists for claims (False: re-evaluating a finished run)

    def stage_output(self, name: str) -> Path:
        """The folder of an earlier, finished stage."""
        folder = self.run_dir / "stages" / name
        if not (folder / DONE).is_file():
            names = [s.name for s in self.recipe.stages]
            hint = "" if name in names else f"; stages: {', '.join(names)}"
            raise ConfigError(f"stage {name!r} has not finished in {self.run_dir}{hint}")
        return folder

    def work_folder(self, depends_on: dict, default_name: str) -> Path:
        """run/work/<stage>-<key>: where a long stage keeps its resumable state (outside its stage folder, which is
        rebuilt on every attempt); the key is a hash of `depends_on`, everything the stage's result depends on."""
        name = self.stage.name if self.stage is not None else default_name
        key = {**depends_on, "earlier_stages": self.depends} if self.depends else depends_on  # e.g. a retrained toy LM
        return self.run_dir / "work" / f"{name}-{stable_hash(key)}"

    def datasets(self, role: str) -> list[Dataset]:
        """The recipe's datasets of one role (`eval` is the split dataset), prepared once into data/<role>-<i>/."""
        if role == "eval":
            return [self.dataset]
        if role not in self.recipe.datasets:
            roles = ", ".join(["eval", *sorted(self.recipe.datasets)])
            raise ConfigError(f"datasets.{role}: the recipe names no datasets with this role; roles: {roles}")
        return [prepare_cached(spec, self.run_dir / "data" / f"{role}-{i}")
                for i, spec in enumerate(self.recipe.datasets[role])]

    def load_teacher(self, stage_name: str) -> "Recommender":
        """Load the teacher a finished "teacher" stage saved under its `model/` folder."""
        return load_teacher_dir(self.stage_output(stage_name) / "model")

    def log(self, message: str) -> None:
        """Append a timestamped line to the run's log.txt (and echo it when progress is on)."""
        prefix = f"[{self.stage.name}] " if self.stage is not None else ""
        append_log(self.run_dir, prefix + message)
        if self.echo is not None and self.progress:
            self.echo(prefix + message)

    def eval_users(self, part: str = "test") -> np.ndarray:
        """The users every stage is scored on: those with a target in `part`, or the recipe's seeded subset of
        `eval.users` of them (seed = `eval.users_seed`, else the recipe seed), ascending."""
        from recalign.eval.evaluate import eval_users, relevant_items

        if self.split is None:
            raise ConfigError("this recipe has no split to evaluate on")
        eligible, _, _ = relevant_items(self.split.part(part), self.dataset.n_users)
        seed = self.recipe.eval.users_seed if self.recipe.eval.users_seed is not None else self.seed
        return eval_users(eligible, self.recipe.eval.users, seed)

    def evaluate(self, model: "Recommender | ListRecommender", part: str = "test", label: str | None = None,
                 **overrides: Any) -> dict:
        """Evaluate a recommender (scores) or a list recommender with the recipe's protocol (ks, full/sampled,
        history exclusion, seed) on the recipe's users (`eval.users`); records `users_hash` of the users.

        The users' lists are kept in <stage>/lists/<label>.pt with the evaluation's setting, so that a claim can
        compare two rows user by user (`recalign.eval.claims`). Default label: the part ("test"), or the part and a
        short hash for other settings than the recipe's; a later evaluation with the same label replaces it.
        """
        from recalign.eval.evaluate import evaluate

        spec = self.recipe.eval
        options = dict(ks=tuple(spec.ks), protocol=spec.protocol, n_negatives=spec.n_negatives, seed=self.seed,
                       exclude_history=spec.exclude_history, progress=self.progress)
        options.update(overrides)
        if self.split is None:
            raise ConfigError("this recipe has no split to evaluate on")
        if "users" not in options and "n_users" not in options:
            options["users"] = self.eval_users(part)  # = n_users=eval.users with the recipe seed
        if options["protocol"] == "sampled" and "candidates_path" not in overrides:
            # One saved candidate file per (data, part, negatives, seed): every stage ranks the same lists, and
            # they can be inspected or reused by other tools.
            options["candidates_path"] = (self.run_dir / "candidates" / f"{part}-{self.dataset.fingerprint()[:12]}-"
                                          f"n{options['n_negatives']}-seed{options['seed']}.pt")
        kept: dict = {}
        result = evaluate(model, self.dataset, self.split, part=part, keep=kept, **options)
        if options.get("users") is not None:
            result["users_hash"] = users_hash(options["users"])
        if self.keep_lists:
            setting = {"part": part, "protocol": options["protocol"], "exclude_history": options["exclude_history"],
                       "parity": options.get("parity")}
            default = {"part": part, "protocol": spec.protocol, "exclude_history": spec.exclude_history,
                       "parity": None}
            # a label of its own for an evaluation under other settings than the recipe's (e.g. history allowed)
            name = label or (part if setting == default else f"{part}-{stable_hash(setting)[:8]}")
            save_lists(self.stage_dir / LISTS / f"{name}.pt", kept, setting)
        return result



LISTS = "lists"  # <stage>/lists/<label>.pt: the evaluated users' lists and targets


def save_lists(path: Path, kept: dict, setting: dict) -> None:
    """Write the tensors an evaluation kept (users, lists, relevant, n_relevant, n_items) and its setting (part,
    protocol, exclude_history, parity); torch.load with weights_only=True reads them back (no arbitrary pickle)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**kept, "setting": {k: v for k, v in setting.items() if v is not None}}, path)


def users_hash(users: "np.ndarray | list[int]") -> str:
    """A short hash of a set of user ids (sorted), to check that stages were scored on the same users."""
    return stable_hash(sorted(int(u) for u in np.asarray(users).tolist()))
