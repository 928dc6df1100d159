"""TRD's settings: the run (`TRDConfig`), the `trd` recipe stage's params (`TRDStageConfig`) and the DQN student
(`DQNConfig`). Every default is the one the code runs with; docs/systems/trd.md compares them with the original's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recalign.config import stage_params_model


class DQNConfig(BaseModel):
    """Settings of the DQN re-ranker. Defaults are the original's where it has one, unless noted."""

    model_config = ConfigDict(extra="forbid")

    n_actions: int = Field(20, ge=1, description="size of the sliding action window over the teacher's list; "
                                                  "1 reproduces the teacher's list exactly")
    state_len: int = Field(5, ge=1, description="number of most recent positive items in the state")
    hidden_sizes: list[int] | None = Field(
        None, description="MLP hidden sizes; None = the paper's rule by embedding size d "
                          "(d=32: 256,128; d=8 or 16: 128,64; otherwise 512,256)")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout after each hidden layer, in training only "
                                                              "(the original also leaves it on at test time)")
    init_std: float = Field(0.1, gt=0.0, description="std of the N(0, std) init of the MLP weights")
    train_embeddings: bool = Field(True, description="fine-tune the embeddings copied from the teacher")
    pred_score: bool = Field(False, description="add sigmoid(teacher score) to the reward of a hit (the original's "
                                                "default is on; its README runs with it off)")
    gamma: float = Field(0.9, ge=0.0, le=1.0, description="discount factor")
    lr: float = Field(0.01, gt=0.0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay")
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="probability of a uniformly random action while "
                                                            "training (the original's 'epsilon=0.9' is the greedy "
                                                            "probability, i.e. 0.1 here)")
    train_steps: int = Field(50, ge=1, description="episode length (picks per user) in training")
    list_length: int = Field(20, ge=1, description="picks per user at inference = length of the refined list")
    epochs: int = Field(4, ge=1, description="passes over the training users (the original makes one)")
    users_per_batch: int = Field(64, ge=1, description="users stepped together by the batched environment")
    buffer_size: int = Field(20_000, ge=1, description="replay buffer capacity in transitions (original: 20, "
                                                       "for one user at a time)")
    batch_size: int = Field(128, ge=1, description="transitions per gradient step (original: 4)")
    learning_starts: int = Field(256, ge=1, description="transitions in the buffer before learning starts")
    updates_per_step: int = Field(1, ge=1, description="gradient steps per batched environment step")
    target_sync: int = Field(8, ge=1, description="copy the online net into the target net every this many "
                                                  "gradient steps")
    grad_clip: float | None = Field(10.0, gt=0.0, description="clip the gradient norm (None: no clipping)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads while training/re-ranking, restored "
                                "afterwards (None: recalign's default, 1: the batches are small, and one thread "
                                "is several times faster on a busy CPU); results do not depend on it")
    seed: int | None = Field(None, description="seed of network init, exploration, replay sampling and dropout "
                                               "(None: 0; the TRD stage uses the recipe seed)")


class TRDConfig(BaseModel):
    """Settings of a TRD run (also the `trd` recipe stage's params, see `TRDStageConfig`)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field("bprmf", description="name of an earlier `teacher` stage of the recipe (trained on the "
                                              "split's train part = train1), or a teacher model name "
                                              "(bprmf, sasrec, popularity) that this stage trains on train1")
    teacher_source: Literal["auto", "stage", "model"] = Field(
        "auto", description="how to read `teacher`: 'stage' = an earlier stage, 'model' = a model trained here "
                            "on train1, 'auto' = a stage when one has that name, else a model")
    teacher_params: dict = Field(default_factory=dict, description="config of a teacher this stage trains "
                                                                   "(ignored when `teacher` names a stage)")
    cand_num: int = Field(1000, ge=1, description="candidate pool size per user (positives + random negatives)")
    candidate_seed: int | None = Field(None, description="seed of the random pool items (default: recipe seed)")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20], description="cut-offs of the reported metrics; "
                                                                              "the student builds max(ks) picks")
    select_metric: str = Field("ndcg@10", description="validation metric that picks the student's epoch")
    parity: Literal["standard", "daisy"] = Field("standard", description="'daisy': the original's daisyRec "
                                                                         "metrics (non-standard, docs/metrics.md "
                                                                         "section 4)")
    oracle_test_transitions: bool = Field(False, description="let test hits update the state as the original "
                                                             "does (leaks test labels; parity only)")
    fractions: list[float] = Field(default_factory=lambda: [0.6, 0.1, 0.1, 0.2],
                                   description="train1/train2/valid/test fractions of the global temporal split "
                                               "the stage makes itself when the recipe's split is another kind")
    embedding_dim: int = Field(32, ge=1, description="embedding size when the teacher has no user/item "
                                                     "embeddings to copy (then they start as N(0, 0.01))")
    dqn: DQNConfig = Field(default_factory=DQNConfig, description="the student's settings (DQNConfig)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads for the whole stage: teacher, pools, "
                                "student (None: recalign's default, 1); the metrics do not depend on it")


# The `trd` stage's params: TRDConfig without the recipe-wide eval settings (`ks` comes from the recipe's eval),
# plus the protocol.
TRDStageConfig = stage_params_model(
    TRDConfig, "TRDStageConfig", doc="Params of a `trd` recipe stage (cut-offs and users: the recipe's eval).",
    protocol=(Literal["recipe", "trd_temporal"], Field(
        "recipe", description="'recipe': re-rank the teacher's top-cand_num list for the recipe's split, scored "
                              "by the recipe's evaluator on its users (comparable); 'trd_temporal': the paper's own "
                              "global temporal split and candidate pools (a parity protocol)")))
