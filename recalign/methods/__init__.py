"""The methods, one package each, and the explicit table of recipe stage kinds (RecBole-style).

Each package has the same anatomy: `config.py` (its settings), `algorithm.py` (the paper's box and the functions it
names, callable without a run folder), `stage.py` (the thin recipe adapter), `report.py` where it has tables or plots,
and the blocks only it uses. A method imports blocks (`recalign.llm`, `recalign.teachers`, `recalign.eval`, ...),
never another method; `lint-imports` checks both rules. The stage modules import no heavy library at import time.
"""

from __future__ import annotations

from recalign.errors import ConfigError
from recalign.methods.llm_sft.stage import LLM_SFT_STAGE
from recalign.methods.recgpt.stage import RECGPT_STAGE
from recalign.methods.reclmgen.stage import RECLMGEN_STAGE
from recalign.methods.sprec.stage import SPREC_STAGE
from recalign.methods.teacher.stage import TEACHER_STAGE
from recalign.methods.toy_lm.stage import TOY_LM_STAGE
from recalign.methods.trackrec.stage import TRACKREC_STAGE
from recalign.methods.trd.stage import TRD_STAGE
from recalign.stages import Stage

# kind (as written in a recipe) -> Stage
STAGE_KINDS: dict[str, Stage] = {
    "teacher": TEACHER_STAGE,
    "trd": TRD_STAGE,
    "llm-sft": LLM_SFT_STAGE,
    "sprec": SPREC_STAGE,
    "reclmgen": RECLMGEN_STAGE,
    "trackrec": TRACKREC_STAGE,
    "recgpt": RECGPT_STAGE,
    "toy-lm": TOY_LM_STAGE,
}
# older recipe kinds that still work: alias -> kind. `controllable` was RecLM-gen's first name here.
KIND_ALIASES: dict[str, str] = {"controllable": "reclmgen"}


def get_stage(kind: str) -> Stage:
    """The Stage of a recipe kind (aliases included); unknown kinds are config errors naming the choices."""
    stage = STAGE_KINDS.get(KIND_ALIASES.get(kind, kind))
    if stage is None:
        raise ConfigError(f"unknown stage kind {kind!r}; choose one of: {', '.join(sorted(STAGE_KINDS))}")
    return stage
