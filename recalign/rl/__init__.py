"""Reinforcement-learning building blocks: the DQN re-ranker used by TRD."""

from recalign.rl.dqn import DQNConfig, DQNReranker, RerankEnv, RerankEpisodes

__all__ = ["DQNConfig", "DQNReranker", "RerankEnv", "RerankEpisodes"]
