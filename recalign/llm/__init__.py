"""LLM building blocks shared by SPRec, RecLM-gen and TrackRec (models, prompts, tasks, SFT, generation, grounding).

Nothing is imported here: transformers / peft / trl are heavy and are loaded inside the functions that need them,
so `import recalign` stays fast. Import the submodules directly (`from recalign.llm.models import load_model`).
"""
