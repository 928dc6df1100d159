"""Data layer: the Dataset, its sources, splits and negative sampling."""

from recalign.data.dataset import Dataset, UserSequences, build_dataset

__all__ = ["Dataset", "UserSequences", "build_dataset"]
