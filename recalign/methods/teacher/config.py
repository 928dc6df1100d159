"""The teacher stage's settings: which classical teacher, and its own settings flat or nested."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TeacherStageConfig(BaseModel):
    """Params of a teacher stage: `model` plus the teacher's own settings, e.g. {model: sasrec, epochs: 30}.

    The settings may also be nested under `params` (the older form); keys given both ways take the flat value.
    Every key is checked against the teacher's Config when the recipe is loaded (`recalign.recipes`).
    """

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="teacher name (recalign.teachers.registry.TEACHERS): popularity | bprmf | sasrec | itemknn | item2vec | neumf | ease")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the teacher's settings, nested (same as giving them flat)")
    seed: int | None = Field(None, description="the teacher's seed (default: the recipe seed)")

    @model_validator(mode="before")
    @classmethod
    def _lift_nested_seed(cls, value: Any) -> Any:
        """A seed given under `params` is the stage's seed (so the recipe seed does not replace it)."""
        if isinstance(value, dict) and value.get("seed") is None and isinstance(value.get("params"), dict) \
                and "seed" in value["params"]:
            nested = dict(value["params"])
            return {**value, "seed": nested.pop("seed"), "params": nested}
        return value

    def teacher_settings(self) -> dict[str, Any]:
        """The teacher's config overrides: nested `params` updated by the flat keys (and the seed when set)."""
        seed = {} if self.seed is None else {"seed": self.seed}
        return {**self.params, **(self.model_extra or {}), **seed}
