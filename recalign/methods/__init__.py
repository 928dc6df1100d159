"""The five systems as single-file recipes over recalign's blocks (imported lazily by the stage registry)."""
