"""recalign: LLM- and RL-based recommendation on one data model and one evaluator."""

__version__ = "0.1.0"
