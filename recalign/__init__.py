"""recalign: LLM- and RL-based recommendation on one data model and one evaluator.

The main objects are reachable from the package itself and imported only on first use (PEP 562), so
`import recalign` stays fast and does not import torch:

    import recalign
    dataset = recalign.prepare_source("synthetic", n_users=200, n_items=100)
    split = recalign.leave_one_out_split(dataset)
    model = recalign.BPRMF(dim=32, epochs=20).fit(dataset, split.train, split.valid)
    metrics = recalign.evaluate(model, dataset, split, ks=[10])
"""

from __future__ import annotations

import importlib

# `typing` costs more to import than this whole module; type checkers treat this name like typing's.
TYPE_CHECKING = False

__version__ = "0.1.0"

# public name -> module that defines it; each module is imported the first time one of its names is used.
_LAZY: dict[str, str] = {
    # data: sources, the Dataset, splits
    "prepare_source": "recalign.data.sources",
    "SOURCES": "recalign.data.sources",
    "Dataset": "recalign.data.dataset",
    "UserSequences": "recalign.data.dataset",
    "Split": "recalign.data.split",
    "leave_one_out_split": "recalign.data.split",
    "global_temporal_split": "recalign.data.split",
    "random_split": "recalign.data.split",
    "kcore_filter": "recalign.data.split",
    # teachers
    "Recommender": "recalign.teachers.base",
    "Popularity": "recalign.teachers.popularity",
    "BPRMF": "recalign.teachers.bprmf",
    "SASRec": "recalign.teachers.sasrec",
    "Item2Vec": "recalign.teachers.item2vec",
    "NeuMF": "recalign.teachers.neumf",
    "ItemKNN": "recalign.teachers.itemknn",
    "EASE": "recalign.teachers.ease",
    "TEACHERS": "recalign.teachers.registry",
    "get_teacher": "recalign.teachers.registry",
    "load_teacher_dir": "recalign.teachers.registry",
    # evaluation
    "evaluate": "recalign.eval.evaluate",
    "ranking_metrics": "recalign.eval.metrics",
    # recipes and runs
    "Recipe": "recalign.config",
    "load_recipe": "recalign.recipes",
    "run_recipe": "recalign.runs",
    # errors (light modules, still loaded lazily for one rule)
    "RecalignError": "recalign.errors",
    "ConfigError": "recalign.errors",
    "DataError": "recalign.errors",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from recalign.config import Recipe
    from recalign.recipes import load_recipe
    from recalign.data.dataset import Dataset, UserSequences
    from recalign.data.sources import SOURCES, prepare_source
    from recalign.data.split import Split, global_temporal_split, kcore_filter, leave_one_out_split, random_split
    from recalign.errors import ConfigError, DataError, RecalignError
    from recalign.eval.evaluate import evaluate
    from recalign.eval.metrics import ranking_metrics
    from recalign.teachers.registry import load_teacher_dir
    from recalign.runs import run_recipe
    from recalign.teachers.base import Recommender
    from recalign.teachers.bprmf import BPRMF
    from recalign.teachers.popularity import Popularity
    from recalign.teachers.registry import TEACHERS, get_teacher
    from recalign.teachers.sasrec import SASRec
    from recalign.teachers.item2vec import Item2Vec
    from recalign.teachers.neumf import NeuMF
    from recalign.teachers.itemknn import ItemKNN
    from recalign.teachers.ease import EASE


def __getattr__(name: str) -> object:
    """Import the module behind a public name on first access and cache the attribute."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'recalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes plus the lazily loaded public names."""
    return sorted(set(globals()) | set(_LAZY))
