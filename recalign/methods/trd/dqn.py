"""DQN re-ranker (TRD's student): a Q-network picks, step by step, one item from a sliding window over a teacher's list.

Read top to bottom (CleanRL style):

1. `DQNConfig`         every setting in one place (the original hard-codes most of them).
2. `RerankEpisodes`    per-user inputs: the teacher's ranked list, ground truth on it, teacher scores, start state.
3. `RerankEnv`         a *batched* environment: many users step at once; windows and states are tensors.
4. `QNetwork`          Q(s, a) = MLP([e_user; e_state_1..S; e_action]), embeddings initialised from the teacher.
5. `ReplayBuffer`      a circular tensor buffer of transitions (user, s, a, r, s', next window, done).
6. `DQNReranker`       `fit` (epsilon-greedy episodes, TD learning with a target network, model selection through
                       a validation callback) and `rerank` (deterministic greedy lists: dropout off, ties -> the
                       teacher's order).

Paper: TRD, Information Sciences 576 (2021) 642-657; reference: systems.md section 4.2.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from recalign.errors import ConfigError
from recalign.eval.curves import CurveLog
from recalign.threads import torch_threads

# ---- 1. settings ----------------------------------------------------------------------------------

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


def hidden_sizes_for(dim: int, config: DQNConfig) -> list[int]:
    """The MLP hidden sizes: the configured ones, or the original's rule by embedding size."""
    if config.hidden_sizes is not None:
        return list(config.hidden_sizes)
    if dim == 32:
        return [256, 128]
    if dim in (8, 16):
        return [128, 64]
    return [512, 256]


# ---- 2. per-user inputs ---------------------------------------------------------------------------

@dataclass
class RerankEpisodes:
    """What the environment needs per user (row): everything is a tensor with one row per user.

    users:          LongTensor [U]       user ids (rows of the user embedding table)
    candidates:     LongTensor [U, C]    the teacher's ranked list, best first; -1 pads short lists at the end
    relevant:       BoolTensor [U, C]    candidates[u, c] is a ground-truth item (None at inference: no labels)
    teacher_scores: FloatTensor [U, C]   the teacher's score of each candidate (for the pred_score reward)
    start_states:   LongTensor [U, S]    the last S positive items before the episode, left-padded with `pad_item`
    """

    users: torch.Tensor
    candidates: torch.Tensor
    relevant: torch.Tensor | None
    teacher_scores: torch.Tensor
    start_states: torch.Tensor

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, rows: torch.Tensor) -> "RerankEpisodes":
        """The episodes of the given rows."""
        return RerankEpisodes(
            users=self.users[rows], candidates=self.candidates[rows],
            relevant=None if self.relevant is None else self.relevant[rows],
            teacher_scores=self.teacher_scores[rows], start_states=self.start_states[rows])


# ---- 3. the batched environment -------------------------------------------------------------------

def hit_reward(position: int) -> float:
    """Reward of a hit at 1-based list position t: (2^1 - 1) / log2(t + 1)."""
    return (2.0 ** 1 - 1.0) / math.log2(position + 1)


class RerankEnv:
    """A batch of users re-ranking their teacher lists in lock-step.

    The action window holds `n_actions` *positions* into each teacher list. Choosing window slot j takes that
    item, removes the slot (later slots shift left, keeping the teacher's order) and appends the next unused
    teacher position, so every teacher item is offered at most once. A hit pushes the item into the state FIFO;
    a miss leaves the state unchanged.
    """

    def __init__(self, episodes: RerankEpisodes, n_actions: int, pad_item: int, pred_score: bool = False):
        self.episodes = episodes
        self.n_actions = n_actions
        self.pad_item = pad_item
        self.pred_score = pred_score
        n_users, n_candidates = episodes.candidates.shape
        # One extra -1 column: positions past the end of a list point there and read as "no item".
        self._items = torch.cat([episodes.candidates, torch.full((n_users, 1), -1, dtype=torch.long)], dim=1)
        self._end = n_candidates
        self.window = torch.arange(n_actions).clamp(max=n_candidates).expand(n_users, n_actions).clone()
        self.next_position = torch.full((n_users,), n_actions, dtype=torch.long)
        self.state = episodes.start_states.clone()
        self.t = 0  # picks made so far; the next pick lands at list position t + 1
        if episodes.relevant is not None:
            self._labels = torch.cat([episodes.relevant, torch.zeros(n_users, 1, dtype=torch.bool)], dim=1)
            self._scores = torch.cat([episodes.teacher_scores.float(), torch.zeros(n_users, 1)], dim=1)

    def window_items(self) -> torch.Tensor:
        """Items currently offered, LongTensor [U, n_actions]; -1 marks an empty slot."""
        return self._items.gather(1, self.window)

    def step(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick window slot `slots[u]` for every user: returns (picked items [U], rewards [U])."""
        rows = torch.arange(len(slots))
        position = self.window[rows, slots]
        item = self._items[rows, position]
        self.t += 1
        reward = torch.zeros(len(slots))
        if self.episodes.relevant is not None:
            hit = self._labels[rows, position] & (item >= 0)
            gain = torch.full((len(slots),), hit_reward(self.t))
            if self.pred_score:
                gain = gain + torch.sigmoid(self._scores[rows, position])
            reward = torch.where(hit, gain, reward)
            # FIFO state update on a hit: drop the oldest item, append the picked one.
            shifted = torch.cat([self.state[:, 1:], item.unsqueeze(1)], dim=1)
            self.state = torch.where(hit.unsqueeze(1), shifted, self.state)
        self._slide(slots)
        return item, reward

    def _slide(self, slots: torch.Tensor) -> None:
        """Remove the chosen slot (keeping order) and append the next teacher position."""
        width = self.n_actions
        if width == 1:
            kept = self.window[:, :0]
        else:
            columns = torch.arange(width - 1).unsqueeze(0)
            kept = self.window.gather(1, columns + (columns >= slots.unsqueeze(1)).long())
        appended = self.next_position.clamp(max=self._end).unsqueeze(1)
        self.window = torch.cat([kept, appended], dim=1)
        self.next_position += 1


# ---- 4. the Q-network -----------------------------------------------------------------------------

class QNetwork(nn.Module):
    """Q(s, a) = MLP([e_user; e_s1..e_sS; e_a]) -> scalar; the padding item has a fixed zero embedding."""

    def __init__(self, user_embeddings: torch.Tensor, item_embeddings: torch.Tensor, config: DQNConfig,
                 generator: torch.Generator):
        super().__init__()
        n_items, dim = item_embeddings.shape
        self.pad_item = n_items
        self.user = nn.Embedding.from_pretrained(user_embeddings.float().clone(), freeze=not config.train_embeddings)
        items = torch.cat([item_embeddings.float(), torch.zeros(1, dim)])
        self.item = nn.Embedding.from_pretrained(items, freeze=not config.train_embeddings, padding_idx=n_items)
        sizes = [(config.state_len + 2) * dim, *hidden_sizes_for(dim, config)]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], 1)
        for layer in [*self.hidden, self.out]:
            nn.init.normal_(layer.weight, 0.0, config.init_std, generator=generator)
            nn.init.zeros_(layer.bias)
        self.dropout = config.dropout

    def forward(self, users: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q-values [B, A] for users [B], states [B, S] and candidate actions [B, A] (-1 = empty slot)."""
        context = torch.cat([self.user(users), self.item(states).flatten(1)], dim=1)  # [B, (S+1)d]
        action = self.item(torch.where(actions >= 0, actions, self.pad_item))         # [B, A, d]
        # The first layer over [context; action] is split by columns: W [c; a] = W_c c + W_a a. The context
        # part is computed once per row instead of once per action (same function, A times less work).
        first = self.hidden[0]
        n_context = context.shape[1]
        x = (F.linear(context, first.weight[:, :n_context], first.bias).unsqueeze(1)
             + F.linear(action, first.weight[:, n_context:]))
        x = F.relu(F.dropout(x, p=self.dropout, training=self.training))
        for layer in self.hidden[1:]:
            x = F.relu(F.dropout(layer(x), p=self.dropout, training=self.training))
        return self.out(x).squeeze(2)


def masked_q(net: QNetwork, users: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Q-values with empty slots at -inf, so argmax and max never choose them."""
    q = net(users, states, actions)
    return q.masked_fill(actions < 0, -torch.inf)


# ---- 5. replay buffer -----------------------------------------------------------------------------

class ReplayBuffer:
    """A circular buffer of transitions, stored as tensors (one row per transition)."""

    def __init__(self, capacity: int, state_len: int, n_actions: int):
        self.capacity = capacity
        self.users = torch.zeros(capacity, dtype=torch.long)
        self.states = torch.zeros(capacity, state_len, dtype=torch.long)
        self.actions = torch.zeros(capacity, dtype=torch.long)
        self.rewards = torch.zeros(capacity)
        self.next_states = torch.zeros(capacity, state_len, dtype=torch.long)
        self.next_windows = torch.zeros(capacity, n_actions, dtype=torch.long)
        self.dones = torch.zeros(capacity, dtype=torch.bool)
        self.size = 0
        self._cursor = 0

    def add(self, users, states, actions, rewards, next_states, next_windows, dones) -> None:
        """Append a batch of transitions, overwriting the oldest when full."""
        n = len(users)
        if n > self.capacity:  # only the newest `capacity` survive anyway
            sl = slice(n - self.capacity, n)
            users, states, actions, rewards = users[sl], states[sl], actions[sl], rewards[sl]
            next_states, next_windows, dones = next_states[sl], next_windows[sl], dones[sl]
            n = self.capacity
        index = (self._cursor + torch.arange(n)) % self.capacity
        self.users[index], self.states[index], self.actions[index] = users, states, actions
        self.rewards[index], self.next_states[index] = rewards, next_states
        self.next_windows[index], self.dones[index] = next_windows, dones
        self._cursor = (self._cursor + n) % self.capacity
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """n transitions drawn uniformly with replacement."""
        index = torch.randint(self.size, (n,), generator=generator)
        return (self.users[index], self.states[index], self.actions[index], self.rewards[index],
                self.next_states[index], self.next_windows[index], self.dones[index])


# ---- 6. the re-ranker -----------------------------------------------------------------------------

class DQNReranker:
    """The DQN student: `fit` on training episodes (labels = the user's next-period items), `rerank` greedily."""

    def __init__(self, user_embeddings: torch.Tensor, item_embeddings: torch.Tensor,
                 config: DQNConfig | None = None, **overrides):
        base = config.model_dump() if config is not None else {}
        base.update(overrides)
        try:
            self.config = DQNConfig(**base)
        except ValidationError as exc:  # -> one readable line naming the field
            first = exc.errors()[0]
            raise ConfigError(f"dqn: field '{'.'.join(map(str, first['loc']))}': {first['msg']}") from None
        self.n_items = item_embeddings.shape[0]
        self.pad_item = self.n_items
        self.seed = self.config.seed if self.config.seed is not None else 0
        self._init_generator = torch.Generator().manual_seed(self.seed)
        self.q_net_ = QNetwork(user_embeddings, item_embeddings, self.config, self._init_generator)
        self.history_: list[dict] = []

    # -- training --------------------------------------------------------------------------------
    def fit(self, episodes: RerankEpisodes, validate: Callable[["DQNReranker"], float] | None = None,
            progress: bool = False, log: Callable[[str], None] | None = None,
            valid_metric: str = "validation") -> "DQNReranker":
        """Train on `episodes` (which must carry labels); after each epoch `validate(self)` scores the current
        net (higher is better, named `valid_metric` in `curve_`) and the best epoch's weights are kept."""
        with torch_threads(self.config.threads):
            return self._fit(episodes, validate, progress, log, valid_metric)

    def _fit(self, episodes: RerankEpisodes, validate: Callable[["DQNReranker"], float] | None,
             progress: bool, log: Callable[[str], None] | None, valid_metric: str) -> "DQNReranker":
        cfg = self.config
        if episodes.relevant is None:
            raise ConfigError("dqn: training episodes need ground-truth labels (relevant)")
        generator = torch.Generator().manual_seed(self.seed + 1)
        q_net = self.q_net_
        target_net = copy.deepcopy(q_net).eval()
        optimizer = torch.optim.Adam([p for p in q_net.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        buffer = ReplayBuffer(cfg.buffer_size, cfg.state_len, cfg.n_actions)
        best_score, best_state, gradient_steps = -math.inf, None, 0
        curve = CurveLog(valid_metric)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 2)  # dropout draws from the global generator; keep it seeded and local
            with _EpochBar(progress, cfg.epochs, "DQN epochs") as advance:
                for epoch in range(1, cfg.epochs + 1):
                    returns, losses = [], []
                    order = torch.randperm(len(episodes), generator=generator)
                    for start in range(0, len(order), cfg.users_per_batch):
                        env = RerankEnv(episodes.subset(order[start:start + cfg.users_per_batch]), cfg.n_actions,
                                        self.pad_item, cfg.pred_score)
                        users = env.episodes.users
                        episode_return = torch.zeros(len(users))
                        for t in range(cfg.train_steps):
                            # Act: epsilon-greedy over the non-empty window slots (greedy ties -> teacher order).
                            states, windows = env.state, env.window_items()
                            q_net.eval()
                            with torch.no_grad():
                                greedy = masked_q(q_net, users, states, windows).argmax(dim=1)
                            explore = torch.rand(len(users), generator=generator) < cfg.epsilon
                            random_slot = _random_valid_slot(windows >= 0, generator)
                            slots = torch.where(explore, random_slot, greedy)
                            actions, rewards = env.step(slots)
                            episode_return += rewards
                            done = torch.full((len(users),), t == cfg.train_steps - 1)
                            valid = actions >= 0  # an exhausted list yields no transition
                            buffer.add(users[valid], states[valid], actions[valid], rewards[valid],
                                       env.state[valid], env.window_items()[valid], done[valid])
                            # Learn: TD(0) towards r + gamma * max_a' Q_target(s', a') over the next window.
                            if buffer.size >= cfg.learning_starts:
                                q_net.train()
                                for _ in range(cfg.updates_per_step):
                                    if gradient_steps % cfg.target_sync == 0:
                                        target_net.load_state_dict(q_net.state_dict())
                                    losses.append(self._learn(q_net, target_net, optimizer, buffer, generator))
                                    gradient_steps += 1
                        returns.append(episode_return)
                    record = {"epoch": epoch, "mean_return": float(torch.cat(returns).mean()),
                              "mean_loss": float(sum(losses) / len(losses)) if losses else float("nan"),
                              "gradient_steps": gradient_steps}
                    if validate is not None:
                        q_net.eval()
                        record["validation"] = float(validate(self))
                        if record["validation"] > best_score:
                            best_score, best_state = record["validation"], copy.deepcopy(q_net.state_dict())
                    self.history_.append(record)
                    curve.add(epoch, record["mean_loss"], record.get("validation"))
                    if log is not None:
                        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in record.items()))
                    advance()
        if best_state is not None:
            q_net.load_state_dict(best_state)
            self.best_epoch_ = max(self.history_, key=lambda r: r["validation"])["epoch"]
        else:
            self.best_epoch_ = cfg.epochs
        q_net.eval()
        self.curve_ = curve.rows
        return self

    def _learn(self, q_net: QNetwork, target_net: QNetwork, optimizer: torch.optim.Optimizer,
               buffer: ReplayBuffer, generator: torch.Generator) -> float:
        """One gradient step of MSE between Q(s, a) and the TD target."""
        cfg = self.config
        users, states, actions, rewards, next_states, next_windows, dones = buffer.sample(cfg.batch_size, generator)
        with torch.no_grad():
            next_q = masked_q(target_net, users, next_states, next_windows).max(dim=1).values
            next_q = torch.where(torch.isfinite(next_q) & ~dones, next_q, torch.zeros_like(next_q))
            target = rewards + cfg.gamma * next_q
        q = q_net(users, states, actions.unsqueeze(1)).squeeze(1)
        loss = F.mse_loss(q, target)
        optimizer.zero_grad()
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(q_net.parameters(), cfg.grad_clip)
        optimizer.step()
        return float(loss.detach())

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def rerank(self, episodes: RerankEpisodes, length: int | None = None, chunk: int = 1024) -> torch.Tensor:
        """Greedy refined lists, LongTensor [U, length] (-1 where a teacher list runs out). Deterministic.

        Without labels (`episodes.relevant` None) the state stays the user's history; with labels the state
        follows hits as in training (the original does this at test time, which leaks test labels).
        """
        with torch_threads(self.config.threads):
            return self._rerank(episodes, length, chunk)

    def _rerank(self, episodes: RerankEpisodes, length: int | None, chunk: int) -> torch.Tensor:
        length = self.config.list_length if length is None else length
        self.q_net_.eval()
        lists = []
        for start in range(0, len(episodes), chunk):
            env = RerankEnv(episodes.subset(torch.arange(start, min(start + chunk, len(episodes)))),
                            self.config.n_actions, self.pad_item, pred_score=False)
            picks = []
            for _ in range(length):
                windows = env.window_items()
                slots = masked_q(self.q_net_, env.episodes.users, env.state, windows).argmax(dim=1)
                slots = torch.where((windows >= 0).any(dim=1), slots, torch.zeros_like(slots))
                picks.append(env.step(slots)[0])
            lists.append(torch.stack(picks, dim=1))
        return torch.cat(lists) if lists else torch.zeros(0, length, dtype=torch.long)

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The Q-network's tensors."""
        return self.q_net_.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> "DQNReranker":
        """Restore the Q-network's tensors."""
        self.q_net_.load_state_dict(tensors)
        return self


def _random_valid_slot(valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random non-empty slot per row (slot 0 when a row has none)."""
    noise = torch.rand(valid.shape, generator=generator).masked_fill(~valid, -1.0)
    return noise.argmax(dim=1)


class _EpochBar:
    """A rich progress bar when enabled; `advance()` moves it by one."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.__enter__()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
