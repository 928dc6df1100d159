"""Which process of a multi-process launch this is (`accelerate launch` / `torchrun` set RANK and WORLD_SIZE)."""

from __future__ import annotations

import os

__all__ = ["process_rank", "world_size"]


def process_rank() -> int:
    """This process's rank under `accelerate launch` / `torchrun` (RANK), 0 in a plain run."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes this launch has (WORLD_SIZE), 1 in a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))
