"""The explicit registry of teachers: name -> Recommender class, and loading a saved teacher folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from recalign.errors import ConfigError, RecalignError
from recalign.io import read_json
from recalign.teachers.base import Recommender
from recalign.teachers.bprmf import BPRMF
from recalign.teachers.ease import EASE
from recalign.teachers.item2vec import Item2Vec
from recalign.teachers.itemknn import ItemKNN
from recalign.teachers.neumf import NeuMF
from recalign.teachers.popularity import Popularity
from recalign.teachers.sasrec import SASRec

TEACHERS: dict[str, type[Recommender]] = {"popularity": Popularity, "bprmf": BPRMF, "sasrec": SASRec,
                                          "item2vec": Item2Vec, "neumf": NeuMF,
                                          "itemknn": ItemKNN, "ease": EASE}


def get_teacher(name: str) -> type[Recommender]:
    """The teacher class registered under `name`; unknown names are config errors listing the choices."""
    if name not in TEACHERS:
        raise ConfigError(f"unknown teacher '{name}'; choose one of: {', '.join(sorted(TEACHERS))}")
    return TEACHERS[name]


def load_teacher_dir(folder: str | os.PathLike) -> Recommender:
    """Load a teacher saved with `Recommender.save` (its teacher.json names the class)."""
    folder = Path(folder)
    meta_file = folder / "teacher.json"
    if not meta_file.is_file():
        raise RecalignError(f"{folder}: no saved teacher here (teacher.json missing)")
    try:
        name = read_json(meta_file)["teacher"]
    except (json.JSONDecodeError, KeyError):
        raise RecalignError(f"{meta_file}: not a teacher description") from None
    return get_teacher(name).load(folder)
