"""Our PPO for LLM policies with per-token rewards (RecLM-gen's RL step, docs/systems/reclmgen.md).

Read top to bottom, one iteration is:

1. **Rollout.** The actor (LoRA adapter "actor") answers every prompt once greedily and `samples` times by sampling.
2. **Reward.** `reward_fn(prompts, responses, response_ids)` gives one FloatTensor per answer with a reward per
   generated token: item rewards on the tokens that close each item (fine-grained) or one list reward on the last
   token (`rewards_on_last_token`); the caller decides. The task rewards are divided by the running std of the
   per-answer reward sums (no mean shift), then every token gets the KL penalty
   r_t = R_t − kl_coef · (log π_old(a_t|s_t) − log π_ref(a_t|s_t)), π_ref = the model with its adapters disabled.
3. **Advantages.** The critic (its own LoRA adapter "critic" + a trained value head, Linear hidden → 1 on the last
   hidden state) gives V(s_t); `gae` gives advantages and returns; the advantages are whitened.
4. **Update.** Up to `ppo_epochs` passes over shuffled mini-batches: clipped policy loss − ent_coef · entropy +
   vf_coef · clipped value loss, gradients clipped per network, AdamW; stop after an epoch whose approximate KL
   (mean of (ρ − 1) − log ρ) exceeds `target_kl`.
5. **Checkpoint.** Both adapters, the value head, the optimizer, the random generator and the reward statistics are
   committed atomically through an `IterationStore`; a rerun after a kill continues at the next iteration and gives
   the same numbers as an uninterrupted run.

Unlike the original, the value head is optimised, saved and reloaded, and the clip ranges are settings.
Everything runs in float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError
from recalign.llm.trainer import (
    LoraConfig,
    all_gather_cat,
    all_reduce_sum,
    average_gradients,
    data_parallel_state,
    known_library_warnings_silenced,
    lora_config,
    merged_copy,
    model_or_folder,
    use_cpu,
)
from recalign.training import epoch_progress

if TYPE_CHECKING:  # annotations only: the store lives in a higher layer (recalign.methods)
    from recalign.checkpoints import IterationStore

__all__ = ["PPOConfig", "PPOTrainer", "PPOResult", "RewardFn", "gae", "masked_mean", "masked_whiten",
           "kl_penalized_rewards", "clipped_policy_loss", "clipped_value_loss", "approx_kl", "entropy_from_logits", "RunningMoments",
           "rewards_on_last_token", "ACTOR", "CRITIC", "LOOP"]

ACTOR, CRITIC, LOOP = "actor", "critic", "ppo"
VALUE_HEAD_FILE, STATE_FILE = "value_head.safetensors", "trainer_state.pt"

# reward_fn(prompts, responses, response_ids) -> one FloatTensor per answer, one value per generated token
RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[torch.Tensor]]


class PPOConfig(BaseModel):
    """PPO hyper-parameters (defaults: RecLM-gen's where it has one, CPU-sized otherwise)."""

    model_config = ConfigDict(extra="forbid")
    # rollout
    greedy: bool = Field(True, description="one greedy answer per prompt")
    samples: int = Field(1, ge=0, description="sampled answers per prompt")
    temperature: float = Field(0.7, gt=0.0, description="sampling temperature; log-probs use logits / temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per answer at most")
    prompts_per_iteration: int | None = Field(None, ge=1, description="prompts drawn per iteration (None = all)")
    # reward and advantages
    kl_coef: float = Field(0.3, ge=0.0, description="KL penalty per token against the reference (adapters off)")
    scale_rewards: bool = Field(True, description="divide task rewards by the running std of answer rewards")
    gamma: float = Field(0.99, ge=0.0, le=1.0, description="GAE discount γ")
    lam: float = Field(1.0, ge=0.0, le=1.0, description="GAE λ")
    whiten_advantages: bool = Field(True, description="whiten advantages over the batch's tokens")
    # loss
    clip_range: float = Field(0.2, gt=0.0, description="policy ratio clip ε: ρ in [1 − ε, 1 + ε]")
    value_clip: float = Field(0.2, gt=0.0, description="value clip: V_old ± value_clip")
    ent_coef: float = Field(0.01, ge=0.0, description="entropy bonus coefficient")
    vf_coef: float = Field(0.1, ge=0.0, description="value loss coefficient")
    # optimisation
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch at most")
    target_kl: float | None = Field(0.05, gt=0.0, description="stop an iteration's epochs once approx-KL exceeds it")
    mini_batch_size: int = Field(8, ge=1, description="answers per optimizer step")
    learning_rate: float = Field(1e-5, gt=0.0, description="AdamW learning rate (actor, critic and value head)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(0.5, gt=0.0, description="gradient norm clip, per network")
    generation_batch_size: int = Field(16, ge=1, description="prompts per generation batch")
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(r=4, alpha=2, dropout=0.0),
                               description="shape of the actor and critic adapters (paper: r 4, α 2, dropout 0)")
    seed: int = Field(0, description="adapter/value-head init, prompt draws, sampling and mini-batch order")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda'")


# ---- pure pieces (tested on hand-made numbers) ------------------------------------------------------------

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                  total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """(values − mean) / std over the masked entries (population std); 0 outside the mask.

    `total` sums over processes (`all_reduce_sum`), so several processes whiten with the statistics of all tokens."""
    count = total(mask.sum()).clamp_min(1.0)
    mean = total((values * mask).sum()) / count
    var = total((((values - mean) ** 2) * mask).sum()) / count
    return (values - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float,
        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [N, T] by generalised advantage estimation; the state after the last token is terminal.

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with V and A zero past each row's last valid token;
    returns = A + V. Rows are right-padded: `mask` is 1 on real tokens.
    """
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):  # a loop over time steps only; every row at once
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t] * mask[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def kl_penalized_rewards(task_rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_t, kl_t) [N, T]: r_t = R_t / scale − kl_coef·kl_t with kl_t = log π(a_t|s_t) − log π_ref(a_t|s_t)."""
    kl = (logp - ref_logp) * mask
    return (task_rewards / scale - kl_coef * kl) * mask, kl


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip_range: float) -> torch.Tensor:
    """Mean over tokens of −min(ρA, clip(ρ, 1 − ε, 1 + ε)A), ρ = exp(logp − old_logp)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    return masked_mean(-torch.minimum(unclipped, clipped), mask)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       value_clip: float) -> torch.Tensor:
    """Mean over tokens of 0.5·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±value_clip)."""
    clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The low-variance KL(π_old‖π) estimate: mean of (ρ − 1) − log ρ over tokens."""
    log_ratio = logp - old_logp
    return masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension."""
    logsm = torch.log_softmax(logits, dim=-1)
    return -(logsm.exp() * logsm).sum(-1)


def rewards_on_last_token(scores: Sequence[float], response_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """List-only placement: each answer's score on its last token, zeros elsewhere."""
    out = []
    for score, ids in zip(scores, response_ids):
        reward = torch.zeros(len(ids))
        if len(ids):
            reward[-1] = float(score)
        out.append(reward)
    return out


class RunningMoments:
    """Running mean and std of a stream of numbers (merged batch by batch; saved with the checkpoint)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 0.0, 0

    def update(self, values: torch.Tensor) -> None:
        """Merge a batch of values into the statistics (Chan et al.'s parallel update)."""
        values = values.double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean, batch_var = float(values.mean()), float(values.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        """The population std; 1 while it is (nearly) zero, so dividing by it is always safe."""
        std = math.sqrt(max(self.var, 0.0))
        return std if std > 1e-8 else 1.0

    def state_dict(self) -> dict:
        """The statistics as plain numbers."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore saved statistics."""
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


# ---- rollouts as tensors ----------------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """Prompt + answer token rows, right-padded, and where each answer token is predicted."""

    input_ids: torch.Tensor       # [N, L] prompt + answer, right-padded
    attention_mask: torch.Tensor  # [N, L]
    positions: torch.Tensor       # [N, T] the position whose output predicts answer token t (prompt_len − 1 + t)
    tokens: torch.Tensor          # [N, T] answer tokens (padding beyond each answer)
    mask: torch.Tensor            # [N, T] 1.0 on real answer tokens

    def rows(self, index: torch.Tensor) -> "Rollouts":
        """The rollouts at `index`, trimmed to their own widest row."""
        width = int(self.attention_mask[index].sum(1).max())
        steps = max(int(self.mask[index].sum(1).max()), 1)
        return Rollouts(self.input_ids[index, :width], self.attention_mask[index, :width],
                        self.positions[index, :steps].clamp(max=width - 1),  # padding steps stay in the trimmed row
                        self.tokens[index, :steps], self.mask[index, :steps])


def pack_rollouts(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
                  device: torch.device | str = "cpu") -> Rollouts:
    """Right-padded tensors of prompt + answer rows (every prompt needs at least one token)."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width, steps = max(lengths), max(max(len(r) for r in response_ids), 1)
    n = len(prompt_ids)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    tokens = torch.full((n, steps), pad_id, dtype=torch.long)
    mask = torch.zeros((n, steps))
    starts = torch.tensor([len(p) - 1 for p in prompt_ids])
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):  # filling rows; the maths below is batched
        input_ids[i, :lengths[i]] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, :lengths[i]] = 1
        tokens[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1.0
    positions = (starts[:, None] + torch.arange(steps)[None, :]).clamp(max=width - 1)
    return Rollouts(input_ids.to(device), attention.to(device), positions.to(device), tokens.to(device),
                    mask.to(device))


def token_logprobs(model, rollouts: Rollouts, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(a_t|s_t), entropy at s_t) [N, T] of the answer tokens under the model's active adapter."""
    logits = model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask).logits
    index = rollouts.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    step_logits = logits.gather(1, index).float() / temperature
    logsm = torch.log_softmax(step_logits, dim=-1)
    logp = logsm.gather(-1, rollouts.tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp * rollouts.mask, entropy * rollouts.mask


def state_values(model, value_head: torch.nn.Module, rollouts: Rollouts) -> torch.Tensor:
    """V(s_t) [N, T]: the value head on the last hidden state where answer token t is predicted."""
    backbone = getattr(model.get_base_model(), "base_model", None)
    if backbone is not None and backbone is not model.get_base_model():
        hidden = backbone(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask).last_hidden_state
    else:  # no separate backbone: ask the LM for its hidden states
        hidden = model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                       output_hidden_states=True).hidden_states[-1]
    index = rollouts.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return value_head(hidden.gather(1, index).float()).squeeze(-1) * rollouts.mask


# ---- the trainer ----------------------------------------------------------------------------------------------

@dataclass
class PPOResult:
    """What `PPOTrainer.train` returns: the model (actor active, eval mode), its value head and one record per
    iteration (mean_reward, kl, policy_loss, value_loss, entropy, approx_kl, clipfrac, ppo_epochs, ...)."""

    model: Any
    value_head: torch.nn.Module
    records: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """Iterations and the first/last mean reward and KL."""
        out: dict = {"ppo_iterations": len(self.records)}
        if self.records:
            for key in ("mean_reward", "kl"):
                out[f"ppo_{key}_first"], out[f"ppo_{key}_last"] = self.records[0][key], self.records[-1][key]
        return out


class PPOTrainer:
    """PPO on a causal LM: actor and critic LoRA adapters on one frozen base, a trained value head, resumable.

    A model object is wrapped in place (a PEFT model is first merged into a copy); a folder is loaded in float32.

    Under `accelerate launch` (N processes) each process rolls out its 1/N of every iteration's prompts, the reward
    statistics, advantage whitening and early stop use all processes' numbers, and the gradients are averaged over
    the processes before every optimizer step (what DDP does; DDP's hooks cannot follow the actor/critic adapter
    switches within one step), so every process holds the same weights. Each process commits to its own `store`
    (`recalign run` gives the ranks > 0 a private scratch run folder; only rank 0 writes the run folder).
    """

    def __init__(self, model_dir_or_model: Any, tokenizer, settings: PPOConfig | None = None):
        from peft import PeftModel, get_peft_model

        self.settings = settings = settings or PPOConfig()
        self.state = data_parallel_state(settings.device)  # None in a plain (one-process) run
        self.device = self.state.device if self.state is not None else \
            torch.device("cpu" if use_cpu(settings.device) else "cuda")
        base = model_or_folder(model_dir_or_model, "PPO model")
        if isinstance(base, PeftModel):  # e.g. the SFT adapter: PPO starts from the merged SFT model
            base = merged_copy(base)
        base = base.to(device=self.device, dtype=torch.float32)
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        with torch.random.fork_rng(devices=[]), known_library_warnings_silenced():
            torch.manual_seed(settings.seed)  # the LoRA A matrices and the value head from the seed only
            self.model = get_peft_model(base, lora_config(settings.lora), adapter_name=ACTOR)
            self.model.add_adapter(CRITIC, lora_config(settings.lora))
            hidden = base.config.hidden_size
            self.value_head = torch.nn.Linear(hidden, 1).to(self.device)
        self.model.eval()  # no dropout anywhere: rollouts and updates see the same functions
        self.actor_params = _adapter_parameters(self.model, ACTOR)
        self.critic_params = _adapter_parameters(self.model, CRITIC) + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(self.actor_params + self.critic_params, lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.reward_stats = RunningMoments()
        self._activate(ACTOR)

    # ---- the loop -----------------------------------------------------------------------------------------------

    def train(self, prompts: Sequence[str], reward_fn: RewardFn, iterations: int,
              store: "IterationStore | None" = None, progress: bool = True) -> PPOResult:
        """Run PPO iterations 1..`iterations` (skipping those `store` already holds) and return the result."""
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("PPO needs at least one prompt; got none")
        if iterations < 0:
            raise ConfigError(f"PPO iterations must be >= 0, got {iterations}")
        records: list[dict] = []
        start = 1
        if store is not None:
            last = store.last_done(LOOP)
            upto = min(last, iterations)  # a rerun asking for fewer iterations gets that iteration's state
            if upto:
                self.load(store.folder(LOOP, upto))
                records = [store.record(store.folder(LOOP, i)) for i in range(1, upto + 1)]
            start = last + 1
        description = "PPO" if start == 1 else f"PPO (from iteration {start})"  # a resumed run: the rest only
        with epoch_progress(max(iterations - start + 1, 0), description, progress, unit="iteration") as advance:
            for iteration in range(start, iterations + 1):
                began = time.perf_counter()
                record = {"loop": LOOP, "iteration": iteration, **self.step(prompts, reward_fn)}
                record["seconds"] = round(time.perf_counter() - began, 3)
                if store is not None:
                    store.commit(store.folder(LOOP, iteration), record, write=self.save)
                records.append(record)
                advance(reward=record["mean_reward"], kl=record["kl"])
        self._activate(ACTOR)
        return PPOResult(model=self.model, value_head=self.value_head, records=records)

    def step(self, prompts: list[str], reward_fn: RewardFn) -> dict:
        """One PPO iteration: rollout, reward, advantages, clipped updates; returns its statistics."""
        s = self.settings
        batch_prompts = self._shard(self._draw(prompts))
        texts, response_ids, row_prompts = self._rollout(batch_prompts)
        scores = _check_rewards(reward_fn(row_prompts, texts, response_ids), response_ids)
        prompt_ids = self.tokenizer(row_prompts, add_special_tokens=False)["input_ids"]
        if any(len(p) == 0 for p in prompt_ids):
            raise ConfigError("PPO prompts must not be empty")
        rollouts = pack_rollouts(prompt_ids, response_ids, self.tokenizer.pad_token_id, self.device)
        task_rewards = _pad(scores, rollouts.mask).to(self.device)

        # π_old, π_ref and V_old on the rollouts, then per-token rewards with the KL penalty
        with torch.no_grad():
            old_logp, ref_logp, old_values = self._evaluate(rollouts)
        sums = all_gather_cat(task_rewards.sum(1))  # every process's answers, in rank order
        if s.scale_rewards:
            self.reward_stats.update(sums)
        scale = self.reward_stats.std if s.scale_rewards else 1.0
        rewards, kl = kl_penalized_rewards(task_rewards, old_logp, ref_logp, rollouts.mask, s.kl_coef, scale)
        advantages, returns = gae(rewards, old_values, s.gamma, s.lam, rollouts.mask)
        if s.whiten_advantages:
            advantages = masked_whiten(advantages, rollouts.mask, total=all_reduce_sum)

        stats = self._update(rollouts, old_logp, old_values, advantages, returns)
        return {"mean_reward": float(sums.mean()), "kl": float(all_gather_cat(kl.sum(1)).mean()),
                "answer_tokens": float(all_gather_cat(rollouts.mask.sum(1)).mean()),
                "reward_std": self.reward_stats.std, **stats}

    # ---- pieces of one iteration ----------------------------------------------------------------------------------

    def _draw(self, prompts: list[str]) -> list[str]:
        """This iteration's prompts: all of them, or a draw of `prompts_per_iteration` from the generator."""
        n = self.settings.prompts_per_iteration
        if n is None or n >= len(prompts):
            return prompts
        order = torch.randperm(len(prompts), generator=self.generator)[:n].tolist()
        return [prompts[i] for i in order]

    def _shard(self, prompts: list[str]) -> list[str]:
        """This process's share of the iteration's prompts (rank r takes every N-th from r); all in a plain run."""
        if self.state is None:
            return prompts
        n, rank = self.state.num_processes, self.state.process_index
        if len(prompts) % n:
            raise ConfigError(f"PPO with {n} processes: the prompts per iteration ({len(prompts)}) must be a "
                              f"multiple of {n}, so every process takes the same number of optimizer steps")
        return prompts[rank::n]

    def _rollout(self, prompts: list[str]) -> tuple[list[str], list[list[int]], list[str]]:
        """Texts, token ids and the prompt of every answer: per prompt the greedy one first, then the samples."""
        from recalign.llm.generate import GenerationConfig, generate

        s = self.settings
        if not s.greedy and not s.samples:
            raise ConfigError("PPO settings: greedy is false and samples is 0, so there are no answers to learn from")
        self._activate(ACTOR)
        groups: list[list[Any]] = [[] for _ in prompts]
        seed = int(torch.randint(2 ** 31 - 1, (1,), generator=self.generator))
        seed += self.state.process_index if self.state is not None else 0  # other prompts, other noise
        if s.greedy:
            greedy = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=False)
            for group, answers in zip(groups, generate(self.model, self.tokenizer, prompts, greedy,
                                                       s.generation_batch_size, return_details=True)):
                group.extend(answers)
        if s.samples:
            sampled = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature,
                                         top_p=s.top_p, num_return_sequences=s.samples, seed=seed)
            for group, answers in zip(groups, generate(self.model, self.tokenizer, prompts, sampled,
                                                       s.generation_batch_size, return_details=True)):
                group.extend(answers)
        rows = [(prompt, answer) for prompt, group in zip(prompts, groups) for answer in group]
        return ([a.text for _, a in rows], [a.token_ids.tolist() for _, a in rows], [p for p, _ in rows])

    def _evaluate(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log π_old, log π_ref and V_old [N, T], computed mini-batch by mini-batch."""
        s, n = self.settings, rollouts.tokens.shape[0]
        old_logp, ref_logp, values = (torch.zeros_like(rollouts.mask) for _ in range(3))
        for start in range(0, n, s.mini_batch_size):
            index = torch.arange(start, min(start + s.mini_batch_size, n), device=rollouts.mask.device)
            part = rollouts.rows(index)
            steps = part.tokens.shape[1]
            self._activate(ACTOR)
            old_logp[index, :steps] = token_logprobs(self.model, part, s.temperature)[0]
            with self.model.disable_adapter():
                ref_logp[index, :steps] = token_logprobs(self.model, part, s.temperature)[0]
            self._activate(CRITIC)
            values[index, :steps] = state_values(self.model, self.value_head, part)
        return old_logp, ref_logp, values

    def _update(self, rollouts: Rollouts, old_logp: torch.Tensor, old_values: torch.Tensor,
                advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        """Clipped PPO epochs over shuffled mini-batches with early stop on approx-KL; mean statistics."""
        s, n = self.settings, rollouts.tokens.shape[0]
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clipfrac": 0.0}
        updates, epochs = 0, 0
        for _ in range(s.ppo_epochs):
            epochs += 1
            epoch_kl, epoch_steps = 0.0, 0
            order = torch.randperm(n, generator=self.generator).to(rollouts.mask.device)
            for start in range(0, n, s.mini_batch_size):
                index = order[start:start + s.mini_batch_size]
                part = rollouts.rows(index)
                steps = part.tokens.shape[1]
                mask = part.mask
                self._activate(ACTOR)
                logp, entropy = token_logprobs(self.model, part, s.temperature)
                old = old_logp[index, :steps]
                pg_loss = clipped_policy_loss(logp, old, advantages[index, :steps], mask, s.clip_range)
                mean_entropy = masked_mean(entropy, mask)
                self._activate(CRITIC)
                values = state_values(self.model, self.value_head, part)
                v_loss = clipped_value_loss(values, old_values[index, :steps], returns[index, :steps], mask,
                                            s.value_clip)
                loss = pg_loss - s.ent_coef * mean_entropy + s.vf_coef * v_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(self.actor_params + self.critic_params)
                torch.nn.utils.clip_grad_norm_(self.actor_params, s.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(self.critic_params, s.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    kl = float(approx_kl(logp, old, mask))
                    clipfrac = float(masked_mean(((logp - old).exp() - 1.0).abs().gt(s.clip_range).float(), mask))
                for key, value in (("policy_loss", pg_loss.item()), ("value_loss", v_loss.item()),
                                   ("entropy", mean_entropy.item()), ("approx_kl", kl), ("clipfrac", clipfrac)):
                    totals[key] += value
                epoch_kl, epoch_steps, updates = epoch_kl + kl, epoch_steps + 1, updates + 1
            epoch_kl = self._mean_over_processes(epoch_kl)  # every process stops after the same epoch
            if s.target_kl is not None and epoch_kl / epoch_steps > s.target_kl:
                break  # the policy moved far enough from the one that collected the rollouts
        self.optimizer.zero_grad(set_to_none=True)
        return {**{k: self._mean_over_processes(v) / max(updates, 1) for k, v in totals.items()},
                "ppo_epochs": epochs, "updates": updates}

    def _mean_over_processes(self, value: float) -> float:
        """The mean of a number over the processes (the number itself in a plain run)."""
        if self.state is None:
            return value
        return float(all_reduce_sum(torch.tensor(float(value), device=self.device))) / self.state.num_processes

    def _activate(self, adapter: str) -> None:
        """Make `adapter` the one the forward pass uses; both adapters stay trainable (PEFT freezes the other)."""
        self.model.set_adapter(adapter)
        for parameter in self.actor_params + self.critic_params:
            parameter.requires_grad_(True)

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write actor/ and critic/ (PEFT adapters), the value head, optimizer, generator and reward statistics."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with known_library_warnings_silenced():
            self.model.save_pretrained(folder, selected_adapters=[ACTOR, CRITIC])
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(folder / VALUE_HEAD_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                    "reward_stats": self.reward_stats.state_dict()}, folder / STATE_FILE)
        return folder

    def load(self, folder: str | Path) -> None:
        """Restore a checkpoint written by `save` (weights, value head, optimizer, generator, statistics)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        for adapter in (ACTOR, CRITIC):
            weights = folder / adapter / "adapter_model.safetensors"
            if not weights.is_file():
                raise ConfigError(f"PPO checkpoint {folder}: {adapter}/adapter_model.safetensors is missing")
            set_peft_model_state_dict(self.model, load_file(str(weights), device=str(self.device)),
                                      adapter_name=adapter)
        self.value_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE), device=str(self.device)))
        state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())
        self.reward_stats.load_state_dict(state["reward_stats"])
        self._activate(ACTOR)


# ---- helpers ----------------------------------------------------------------------------------------------------

def _adapter_parameters(model, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of one named adapter, in a fixed order."""
    return [p for name, p in model.named_parameters() if "lora_" in name and f".{adapter}." in name]


def _check_rewards(rewards: Sequence[torch.Tensor], response_ids: list[list[int]]) -> list[torch.Tensor]:
    """The reward tensors as float vectors, one value per answer token (else a ConfigError naming the answer)."""
    rewards = list(rewards)
    if len(rewards) != len(response_ids):
        raise ConfigError(f"reward_fn returned {len(rewards)} rewards for {len(response_ids)} answers")
    out = []
    for i, (reward, ids) in enumerate(zip(rewards, response_ids)):
        reward = torch.as_tensor(reward, dtype=torch.float32).flatten()
        if reward.numel() != len(ids):
            raise ConfigError(f"reward_fn: answer {i} has {len(ids)} tokens but {reward.numel()} rewards")
        if not torch.isfinite(reward).all():
            raise ConfigError(f"reward_fn: answer {i} has a non-finite reward")
        out.append(reward)
    return out


def _pad(rewards: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-token reward vectors as one right-padded [N, T] tensor."""
    out = torch.zeros(mask.shape)
    for i, reward in enumerate(rewards):
        out[i, :reward.numel()] = reward
    return out
