"""The explicit registry of teachers: name -> Recommender class."""

from __future__ import annotations

from recalign.errors import ConfigError
from recalign.teachers.base import Recommender
from recalign.teachers.bprmf import BPRMF
from recalign.teachers.popularity import Popularity
from recalign.teachers.sasrec import SASRec

TEACHERS: dict[str, type[Recommender]] = {"popularity": Popularity, "bprmf": BPRMF, "sasrec": SASRec}


def get_teacher(name: str) -> type[Recommender]:
    """The teacher class registered under `name`; unknown names are config errors listing the choices."""
    if name not in TEACHERS:
        raise ConfigError(f"unknown teacher '{name}'; choose one of: {', '.join(sorted(TEACHERS))}")
    return TEACHERS[name]
