"""DQN re-ranker (TRD's student): a Q-network picks, step by step, one item from a sliding window over a teacher's list.

Read top to bottom (CleanRL style):

1. `DQNConfig`         every setting in one place (the original hard-codes most of them); defined in config.py.
2. `RerankEpisodes`    per-user inputs: the teacher's ranked list, ground truth on it, teacher scores, start state.
3. `RerankEnv`         a *batched* environment: many users step at once; windows and states are tensors.
4. `QNetwork`          Q(s, a) = MLP([e_user; e_state_1..S; e_action]), embeddings initialised from the teacher.
5. `ReplayBuffer`      a circular tensor buffer of transitions (user, s, a, r, s', next window, done).
6. `DQNReranker`       `fit` (epsilon-greedy episodes, TD learning with a target network, model selection through
                       a validation callback) and `rerank` (deterministic greedy lists: dropout off, ties -> the
                       teacher's order).

Paper: TRD, Information Sciences 576 (2021) 642-657; reference: docs/systems/trd.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from recalign.errors import ConfigError
from recalign.eval.curves import CurveLog
from recalign.methods.trd.config import DQNConfig
from recalign.threads import torch_threads
from recalign.training import epoch_progress

# ---- 1. settings (`DQNConfig`, in config.py) -----------------------------------------------------

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
        """`fit` under the configured threads: `epochs` x (`_train_epoch`, `_end_epoch`), then `_keep_best`."""
        cfg = self.config
        if episodes.relevant is None:
            raise ConfigError("dqn: training episodes need ground-truth labels (relevant)")
        run = self._start_training(valid_metric)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 2)  # dropout draws from the global generator; keep it seeded and local
            with epoch_progress(cfg.epochs, "DQN epochs", progress, unit="epoch", transient=True) as advance:
                for epoch in range(1, cfg.epochs + 1):
                    record = self._train_epoch(run, episodes, epoch)
                    self._end_epoch(run, record, validate, log)
                    advance()
        self._keep_best(run)
        return self

    def _start_training(self, valid_metric: str) -> "_Training":
        """A fresh training run: generator, target net, optimiser, empty replay buffer, empty curve."""
        cfg = self.config
        generator = torch.Generator().manual_seed(self.seed + 1)
        q_net = self.q_net_
        target_net = copy.deepcopy(q_net).eval()
        optimizer = torch.optim.Adam([p for p in q_net.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        buffer = ReplayBuffer(cfg.buffer_size, cfg.state_len, cfg.n_actions)
        return _Training(generator, q_net, target_net, optimizer, buffer, CurveLog(valid_metric))

    def _train_epoch(self, run: "_Training", episodes: RerankEpisodes, epoch: int) -> dict:
        """One pass over the training users in a seeded order, `users_per_batch` at a time; the epoch's record."""
        cfg = self.config
        returns, losses = [], []
        order = torch.randperm(len(episodes), generator=run.generator)
        for start in range(0, len(order), cfg.users_per_batch):
            batch = episodes.subset(order[start:start + cfg.users_per_batch])
            returns.append(self._train_batch(run, batch, losses))
        return {"epoch": epoch, "mean_return": float(torch.cat(returns).mean()),
                "mean_loss": float(sum(losses) / len(losses)) if losses else float("nan"),
                "gradient_steps": run.gradient_steps}

    def _train_batch(self, run: "_Training", batch: RerankEpisodes, losses: list[float]) -> torch.Tensor:
        """`train_steps` lock-step picks of a batch of users: act, store the transitions, learn; their returns."""
        cfg = self.config
        env = RerankEnv(batch, cfg.n_actions, self.pad_item, cfg.pred_score)
        users = env.episodes.users
        episode_return = torch.zeros(len(users))
        for t in range(cfg.train_steps):
            states, windows = env.state, env.window_items()
            slots = self._explore(run, users, states, windows)
            actions, rewards = env.step(slots)
            episode_return += rewards
            done = torch.full((len(users),), t == cfg.train_steps - 1)
            valid = actions >= 0  # an exhausted list yields no transition
            run.buffer.add(users[valid], states[valid], actions[valid], rewards[valid],
                           env.state[valid], env.window_items()[valid], done[valid])
            if run.buffer.size >= cfg.learning_starts:
                self._learn_steps(run, losses)
        return episode_return

    def _explore(self, run: "_Training", users: torch.Tensor, states: torch.Tensor,
                 windows: torch.Tensor) -> torch.Tensor:
        """Act: epsilon-greedy over the non-empty window slots (greedy ties -> teacher order)."""
        run.q_net.eval()
        with torch.no_grad():
            greedy = masked_q(run.q_net, users, states, windows).argmax(dim=1)
        explore = torch.rand(len(users), generator=run.generator) < self.config.epsilon
        random_slot = _random_valid_slot(windows >= 0, run.generator)
        return torch.where(explore, random_slot, greedy)

    def _learn_steps(self, run: "_Training", losses: list[float]) -> None:
        """Learn: `updates_per_step` TD(0) steps towards r + gamma * max_a' Q_target(s', a') over the next window,
        syncing the target net every `target_sync` gradient steps."""
        cfg = self.config
        run.q_net.train()
        for _ in range(cfg.updates_per_step):
            if run.gradient_steps % cfg.target_sync == 0:
                run.target_net.load_state_dict(run.q_net.state_dict())
            losses.append(self._learn(run.q_net, run.target_net, run.optimizer, run.buffer, run.generator))
            run.gradient_steps += 1

    def _end_epoch(self, run: "_Training", record: dict, validate: Callable[["DQNReranker"], float] | None,
                   log: Callable[[str], None] | None) -> None:
        """Score the epoch with `validate` (keeping the best weights so far), then record and log it."""
        if validate is not None:
            run.q_net.eval()
            record["validation"] = float(validate(self))
            if record["validation"] > run.best_score:
                run.best_score, run.best_state = record["validation"], copy.deepcopy(run.q_net.state_dict())
        self.history_.append(record)
        run.curve.add(record["epoch"], record["mean_loss"], record.get("validation"))
        if log is not None:
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def _keep_best(self, run: "_Training") -> None:
        """Restore the best validated epoch's weights (the last epoch's without `validate`); set `best_epoch_`,
        `curve_` and eval mode."""
        if run.best_state is not None:
            run.q_net.load_state_dict(run.best_state)
            self.best_epoch_ = max(self.history_, key=lambda r: r["validation"])["epoch"]
        else:
            self.best_epoch_ = self.config.epochs
        run.q_net.eval()
        self.curve_ = run.curve.rows

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


@dataclass
class _Training:
    """What one `DQNReranker.fit` call updates: the nets, the optimiser, the replay buffer, the generator of
    exploration and replay sampling, the gradient step count, the best validated weights and the curve."""

    generator: torch.Generator
    q_net: QNetwork
    target_net: QNetwork
    optimizer: torch.optim.Optimizer
    buffer: ReplayBuffer
    curve: CurveLog
    gradient_steps: int = 0
    best_score: float = -math.inf
    best_state: dict | None = None
