"""Recipes: pydantic models, YAML loading and `key=value` overrides; unknown keys anywhere are errors."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recalign.errors import ConfigError, quoted, shorten
from recalign.eval.claims import ClaimConfig, metric_k


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(StrictConfig):
    """Where the interactions come from: a source + raw files (prepared on the fly), or a prepared folder."""

    source: str | None = Field(None, description="dataset source name (see `recalign data prepare --help`)")
    raw: str | None = Field(None, description="raw file or folder the source reads (not needed for `synthetic`)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the source")
    path: str | None = Field(None, description="a folder written by `recalign data prepare` (instead of source)")

    @model_validator(mode="after")
    def _one_origin(self) -> "DataConfig":
        if (self.source is None) == (self.path is None):
            raise ValueError("give exactly one of 'source' (with 'raw' and 'options') or 'path'")
        if self.path is not None and (self.raw is not None or self.options):
            raise ValueError("'raw' and 'options' belong to 'source', not to 'path'")
        return self


class SplitConfig(StrictConfig):
    """How interactions are split into train / (train2) / valid / test."""

    kind: Literal["leave_one_out", "global_temporal", "random", "cold_start"] = "leave_one_out"
    fractions: list[float] | None = Field(
        None, description="global_temporal: train1, train2, valid, test (default 0.6 0.1 0.1 0.2); "
                          "random: train, valid, test (default 0.8 0.1 0.1)")
    seed: int | None = Field(None, description="random split seed (default: the recipe seed)")
    kcore: int | list[int] | None = Field(None, description="k-core filter before splitting: k or [k_user, k_item]")
    window: list[int] | None = Field(None, description="cold_start: [min, max] items per user window "
                                                      "(history = window minus its last item; default [2, 4])")

    @field_validator("window")
    @classmethod
    def _window_pair(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) != 2 or value[0] < 2 or value[1] < value[0]):
            raise ValueError(f"window is [min, max] with 2 <= min <= max, got {value}")
        return value

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (any(f < 0 for f in value) or abs(sum(value) - 1.0) > 1e-6):
            raise ValueError(f"fractions must be non-negative and sum to 1, got {value}")
        return value

    @field_validator("kcore")
    @classmethod
    def _kcore_pair(cls, value: int | list[int] | None) -> int | list[int] | None:
        if isinstance(value, list) and len(value) != 2:
            raise ValueError("kcore is k or [k_user, k_item]")
        return value


class EvalConfig(StrictConfig):
    """How every stage is evaluated (one evaluator for all, so numbers are comparable)."""

    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20], description="cut-offs K of the @K metrics")
    protocol: Literal["full", "sampled"] = Field("full", description="rank all items, or target + n_negatives")
    n_negatives: int = Field(100, ge=1, description="negatives per user for the sampled protocol")
    exclude_history: bool = Field(True, description="never recommend items the user already interacted with")
    users: int | None = Field(None, ge=1, description="score every stage on the same seeded subset of this many "
                                                      "test users (seed = users_seed; null = all users)")
    users_seed: int | None = Field(None, description="seed of the eval.users subset (null: the recipe seed); "
                                                     "`recalign run --seeds` sets it to the recipe's own seed so "
                                                     "every seed of a sweep is scored on the same users")
    table: list[str] | None = Field(
        None, description="metric columns of the results table (default: hr/ndcg/recall/mrr at 10)")
    backend: Literal["local", "ray"] = Field(
        "local", description="where LLM stages generate their evaluation answers: in-process, or split over Ray "
                             "workers that each load the stage's saved model (pip install 'recalign[ray]')")
    workers: int = Field(2, ge=1, description="eval.backend ray: workers; users are cut into this many contiguous "
                                              "shards")

    def hashed(self, exclude: set[str] | frozenset[str] = frozenset()) -> dict:
        """The settings a result depends on, as JSON (`exclude` left out, and `users_seed` while unset, so
        run folders written before it existed keep their hashes)."""
        unset = {"users_seed"} if self.users_seed is None else set()
        return self.model_dump(mode="json", exclude=set(exclude) | unset)

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("ks must be a non-empty list of positive integers")
        return sorted(set(value))


class StageConfig(StrictConfig):
    """One step of a recipe: a unique name, a registered kind and that kind's params."""

    name: str = Field(description="unique name; also the stage's folder under stages/")
    kind: str = Field(description="a kind of the table recalign.methods.STAGE_KINDS")
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value) or value.startswith("."):
            raise ValueError(f"stage name {quoted(value)} must be letters, digits, '-', '_' or '.'")
        return value


MAX_NAME = 100


def check_folder_name(value: str) -> str:
    """A run name must be one plain folder name: no separators, no '..', no control characters, <= 100 chars."""
    if not value:
        raise ValueError("must not be empty (it names the run folder)")
    if len(value) > MAX_NAME:
        raise ValueError(f"at most {MAX_NAME} characters (it names the run folder), got {len(value)}")
    if "/" in value or "\\" in value:
        raise ValueError(f"{quoted(value)} must be a plain folder name, without '/' or '\\'")
    if value.startswith("."):
        raise ValueError(f"{quoted(value)} must not start with '.' (no '..', no hidden folders)")
    if any(not c.isprintable() for c in value):
        raise ValueError(f"{quoted(value)} must not contain control characters")
    return value


class Recipe(StrictConfig):
    """A whole experiment: data, split, evaluation protocol and the stages to run in order."""

    name: str = Field(description="run name; the default run folder is runs/<name>")
    description: str = ""
    seed: int = Field(0, description="seed of every stage (python, numpy, torch)")
    data: DataConfig | None = Field(None, description="the dataset that is split and evaluated (role `eval`)")
    datasets: dict[str, list[DataConfig]] = Field(
        default_factory=dict, description="more datasets by role, e.g. {pretrain: [{source: ..}, ..]}; "
                                          "`eval` (one dataset) may stand here instead of `data`")
    split: SplitConfig = Field(default_factory=SplitConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    stages: list[StageConfig] = Field(description="the stages to run in order (at least one)")
    claims: list[ClaimConfig] = Field(default_factory=list,
                                    description="claims checked after the stages: a row against a baseline row on "
                                                "one metric, paired bootstrap over the same users "
                                                "(recalign.eval.claims)")

    @model_validator(mode="after")
    def _claims_name_stages(self) -> "Recipe":
        names = {stage.name for stage in self.stages}
        for i, claim in enumerate(self.claims):
            if metric_k(claim.metric) > max(self.eval.ks):
                raise ValueError(f"claims[{i}].metric: {claim.metric} is cut at a K above the largest eval.ks "
                                 f"({max(self.eval.ks)}): the evaluated lists are not that long")
            for key in ("row", "baseline"):
                stage = getattr(claim, key).partition(":")[0]
                if stage not in names:
                    raise ValueError(f"claims[{i}].{key}: no stage named {quoted(stage)}; stages: "
                                     f"{', '.join(s.name for s in self.stages)}")
        return self

    @field_validator("datasets", mode="before")
    @classmethod
    def _roles_as_lists(cls, value: Any) -> Any:
        """A role may name one dataset (a mapping) or several (a list)."""
        if isinstance(value, dict):
            return {role: [spec] if isinstance(spec, dict) else spec for role, spec in value.items()}
        return value

    @field_validator("datasets")
    @classmethod
    def _plain_roles(cls, value: dict[str, list[DataConfig]]) -> dict[str, list[DataConfig]]:
        for role, specs in value.items():
            check_folder_name(role)
            if not specs:
                raise ValueError(f"role {quoted(role)} names no dataset")
        return value

    @model_validator(mode="after")
    def _eval_dataset(self) -> "Recipe":
        """`data` is the `eval` role; `datasets.eval` (exactly one) may give it instead."""
        if "eval" in self.datasets:
            if self.data is not None:
                raise ValueError("give the evaluation dataset once: 'data' or 'datasets.eval', not both")
            if len(self.datasets["eval"]) != 1:
                raise ValueError("datasets.eval names exactly one dataset (it is split and evaluated)")
            self.data = self.datasets.pop("eval")[0]
        if self.data is None:
            raise ValueError("missing 'data' (or 'datasets.eval'): the dataset to split and evaluate on")
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_folder_name(value)

    @field_validator("stages")
    @classmethod
    def _some_unique_stages(cls, stages: list[StageConfig]) -> list[StageConfig]:
        if not stages:
            raise ValueError("a recipe needs at least one stage")
        seen: set[str] = set()
        for stage in stages:
            if stage.name in seen:
                raise ValueError(f"two stages are named {quoted(stage.name)}")
            seen.add(stage.name)
        return stages

    def stage(self, name: str) -> StageConfig:
        """The stage called `name`."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"no stage named {quoted(name)}; stages: {', '.join(s.name for s in self.stages)}")

    def to_yaml(self) -> str:
        """The resolved recipe (defaults filled in) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---- loading --------------------------------------------------------------------------------------

def read_yaml(path: str | os.PathLike) -> dict:
    """Parse a YAML mapping; syntax errors name file:line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such recipe file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text ({exc.reason})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: a recipe is a YAML mapping (name, seed, data, split, eval, stages)")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value parsed as a YAML scalar or flow list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {quoted(text)} must look like key=value "
                          "(dotted key, e.g. stages.sasrec.params.epochs=5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal text (e.g. a path with a colon)
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw recipe dict with each `key=value` applied; stages are addressed by name."""
    result = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = result
        walked: list[str] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                node, index = _list_child(node, part, walked, text)
                walked.append(part)
                if last:
                    raise ConfigError(f"override {quoted(text)}: cannot replace a whole stage; "
                                      "set its fields instead")
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {quoted(text)}: {quoted('.'.join(walked))} is not a mapping")
            walked.append(part)
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return result


def _list_child(items: list, part: str, walked: list[str], text: str) -> tuple[Any, int]:
    """Find a stage in the stages list by name (or by index)."""
    for index, entry in enumerate(items):
        if isinstance(entry, dict) and entry.get("name") == part:
            return entry, index
    if part.isdigit() and int(part) < len(items):
        return items[int(part)], int(part)
    names = [str(e.get("name")) for e in items if isinstance(e, dict)]
    raise ConfigError(f"override {quoted(text)}: no stage named {quoted(part)} under '{'.'.join(walked)}'; "
                      f"stages: {shorten(', '.join(names), 200) or '(none)'}")


def validate_data_source(data: DataConfig, source: str = "<recipe>", override_keys: list[list[str]] | None = None,
                         prefix: list[str] | None = None) -> None:
    """Check `data.source` is a registered source and `data.options` fit its options model (before any work)."""
    if data.source is None:
        return
    from recalign.data.sources import SOURCES, get_source

    where = ".".join(prefix or ["data"])
    if data.source not in SOURCES:
        raise ConfigError(f"{source}: {where}.source: unknown source {quoted(data.source)}; choose one of: "
                          f"{', '.join(SOURCES)}")
    try:
        get_source(data.source).options.model_validate(data.options)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, None, source, override_keys or [],
                                    prefix=[*(prefix or ["data"]), "options"])) from None
    if data.raw is None and get_source(data.source).needs_raw:
        raise ConfigError(f"{source}: {where}.raw: source {data.source!r} needs the raw file or folder")


# Evaluation settings that live at recipe level only, so that every stage is scored on the same users and K.
MOVED_TO_EVAL = {"ks": "eval.ks", "eval_rows": "eval.users"}


def stage_params_model(config: type[BaseModel], name: str, drop: tuple[str, ...] = tuple(MOVED_TO_EVAL),
                       doc: str | None = None, **fields: Any) -> type[BaseModel]:
    """A stage's params model: a method's config without the recipe-wide eval settings (`drop`), plus `fields`
    (name=(type, Field(...))), unknown keys forbidden."""
    from pydantic import create_model

    kept = {key: (info.annotation, info) for key, info in config.model_fields.items() if key not in drop}
    model = create_model(name, __config__=ConfigDict(extra="forbid"), **kept, **fields)
    model.__doc__ = doc or config.__doc__
    return model


def _describe(exc: ValidationError, raw: dict | None, source: str, override_keys: list[list[str]],
              prefix: list[str] | None = None) -> str:
    """One line for the first validation error: where, the dotted key (stages by name) and what was wrong."""
    first = exc.errors()[0]
    loc = list(prefix or []) + [str(p) for p in first.get("loc", ())]
    loc = _name_stages(loc, raw)
    key = ".".join(shorten(part) for part in loc) or "(top level)"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        what = "unknown key"
    elif kind == "missing":
        what = "missing required key"
    elif kind == "value_error":  # our own validators: the message already says what is wrong
        what = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    else:
        what = first.get("msg", "invalid value")
        if first.get("input") is not None and kind not in ("model_type", "dict_type"):
            what += f" (got {shorten(repr(first['input']))})"
    from_override = bool(loc) and any(loc[:len(k)] == k or k[:len(loc)] == loc for k in override_keys)
    origin = f"{source} (override)" if from_override else source
    return f"{origin}: {key}: {what}"


def _name_stages(loc: list[str], raw: dict | None) -> list[str]:
    """Replace `stages.<index>` by `stages.<name>` so users see the name they wrote."""
    if raw is None or len(loc) < 2 or loc[0] != "stages" or not loc[1].isdigit():
        return loc
    stages = raw.get("stages")
    index = int(loc[1])
    if isinstance(stages, list) and index < len(stages) and isinstance(stages[index], dict) \
            and isinstance(stages[index].get("name"), str):
        return [loc[0], stages[index]["name"], *loc[2:]]
    return loc
