"""RQ-KMeans item tokenizer: an item's text embedding -> `levels` residual k-means codes + 1 disambiguating code.

Level 0 clusters the embeddings into `codebook_size` centroids; level l clusters what is left after subtracting the
centroids of levels < l (the residual). An item's code is its centroid index per level. Each level is seeded
(k-means++ or random distinct points) and refined by a fixed number of Lloyd iterations, all in torch tensor ops
(a Python loop runs only over levels, iterations and k-means++ picks, never over items). With `balanced`, each
level's assignment is capacity-constrained: every centroid takes at most ceil(N / codebook_size) items, the closest
first (`balanced_assign`). Items that share all level codes get an extra position numbering them, exactly as FSQ
codes do (`codes.disambiguate`), so every catalog item has a unique code and the same `ItemCodes` path follows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from recalign.errors import ConfigError, DataError, writing
from recalign.io import atomic_path
from recalign.methods.recgpt.codes import ItemCodes, disambiguate, read_safetensors

__all__ = ["RQKMeansConfig", "RQKMeansTokenizer", "balanced_assign", "kmeans", "squared_distances"]

FORMAT = "recalign.methods.recgpt.RQKMeansTokenizer/1"
INITS = ("kmeans++", "random")


@dataclass
class RQKMeansConfig:
    """Residual k-means shape and settings."""

    levels: int = 3
    codebook_size: int = 256
    iterations: int = 20
    init: str = "kmeans++"
    balanced: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("levels", "codebook_size", "iterations"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"rq_kmeans.{name}: must be >= 1, got {getattr(self, name)}")
        if self.init not in INITS:
            raise ConfigError(f"rq_kmeans.init: expected one of {INITS}, got {self.init!r}")


def squared_distances(x: torch.Tensor, centroids: torch.Tensor, x_norms: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Squared Euclidean distances [N, K] of points x [N, d] to centroids [K, d] (float64, clamped at 0);
    `x_norms` [N]: the points' squared norms, when already known."""
    x, centroids = x.double(), centroids.double()
    x_norms = torch.einsum("nd,nd->n", x, x) if x_norms is None else x_norms
    c_norms = torch.einsum("kd,kd->k", centroids, centroids)
    return torch.addmm(x_norms[:, None] + c_norms[None, :], x, centroids.T, alpha=-2).clamp_min_(0)


def _initial_centroids(x: torch.Tensor, k: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """k seeded starting centroids: distinct random points (repeated when N < k) or k-means++ picks."""
    n = x.shape[0]
    if init == "random":
        return x[torch.randperm(n, generator=generator)[torch.arange(k) % n]].clone()
    norms = torch.einsum("nd,nd->n", x, x)

    def distance_to(i: int) -> torch.Tensor:  # squared distances of every point to point i (a matrix-vector product)
        return (norms - 2 * (x @ x[i]) + norms[i]).clamp_min(0)

    picks = [int(torch.randint(n, (1,), generator=generator))]
    nearest = distance_to(picks[0])
    for _ in range(1, k):  # one vectorised distance update per centroid
        total = float(nearest.sum())
        if total > 0:
            pick = int(torch.multinomial(nearest / total, 1, generator=generator))
        else:  # every point already coincides with a centroid: any point will do
            pick = int(torch.randint(n, (1,), generator=generator))
        picks.append(pick)
        nearest = torch.minimum(nearest, distance_to(pick))
    return x[torch.tensor(picks)].clone()


def balanced_assign(distances: torch.Tensor) -> torch.Tensor:
    """Cluster of each point [N] with at most ceil(N / K) points per cluster, nearest pairs first.

    Rounds of proposals: every unassigned point proposes to its nearest cluster with room left; a cluster accepts
    its closest proposers up to its room (ties by point index). A round either places every proposer or fills a
    cluster, so there are at most K + 1 rounds.
    """
    n, k = distances.shape
    room = torch.full((k,), -(-n // k), dtype=torch.long)
    out = torch.full((n,), -1, dtype=torch.long)
    while (todo := torch.nonzero(out < 0)[:, 0]).numel():
        d = distances[todo].masked_fill((room == 0)[None, :], float("inf"))
        choice = d.argmin(1)
        order = torch.argsort(d.gather(1, choice[:, None])[:, 0], stable=True)
        order = order[torch.argsort(choice[order], stable=True)]  # grouped by cluster, closest first
        counts = torch.bincount(choice, minlength=k)
        rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[choice[order]]
        accepted = order[rank < room[choice[order]]]
        out[todo[accepted]] = choice[accepted]
        room -= torch.bincount(choice[accepted], minlength=k)
    return out


def _assign(x: torch.Tensor, centroids: torch.Tensor, balanced: bool, x_norms: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Cluster of each point: the nearest centroid, or the capacity-constrained one."""
    distances = squared_distances(x, centroids, x_norms)
    return balanced_assign(distances) if balanced else distances.argmin(1)


def kmeans(x: torch.Tensor, k: int, iterations: int, init: str = "kmeans++", balanced: bool = False,
           seed: int = 0) -> torch.Tensor:
    """Centroids [k, d] (x's dtype) after seeded initialisation and `iterations` Lloyd steps, computed in float64
    (an empty cluster keeps its centroid)."""
    generator = torch.Generator().manual_seed(seed)
    points = x.double()
    norms = torch.einsum("nd,nd->n", points, points)
    centroids = _initial_centroids(points, k, init, generator)
    for _ in range(iterations):
        cluster = _assign(points, centroids, balanced, norms)
        sums = torch.zeros_like(centroids).scatter_add_(0, cluster[:, None].expand_as(points), points)
        counts = torch.bincount(cluster, minlength=k)
        centroids = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], centroids)
    return centroids.to(x.dtype)


class RQKMeansTokenizer:
    """Text embeddings -> unique item codes (`ItemCodes`) by residual k-means: fit on a catalog, encode any."""

    def __init__(self, settings: RQKMeansConfig | None = None):
        self.settings = settings or RQKMeansConfig()
        self.centroids: torch.Tensor | None = None  # [levels, codebook_size, d]
        self.history: list[float] = []  # mean squared residual norm after each level

    @property
    def codebook_size(self) -> int:
        """Codes per level position."""
        return int(self.settings.codebook_size)

    def _check(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embeddings as finite float32 [N, d] (matching a fitted d)."""
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if x.dim() != 2:
            raise DataError(f"embeddings: expected [N, d], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise DataError("embeddings: contain NaN or infinite values")
        if self.centroids is not None and x.shape[1] != self.centroids.shape[2]:
            raise DataError(f"embeddings: dimension {x.shape[1]} differs from the fitted {self.centroids.shape[2]}")
        return x

    def fit(self, embeddings: np.ndarray | torch.Tensor) -> RQKMeansTokenizer:
        """Fit every level's centroids on the residuals of the levels before it (seed + level per level)."""
        x = self._check(embeddings)
        if x.shape[0] == 0:
            raise DataError("embeddings: no items to fit the tokenizer on")
        s = self.settings
        residual, books, self.history = x.clone(), [], []
        for level in range(s.levels):
            centroids = kmeans(residual, s.codebook_size, s.iterations, s.init, s.balanced, s.seed + level)
            residual = residual - centroids[_assign(residual, centroids, s.balanced)]
            books.append(centroids)
            self.history.append(float((residual.double() ** 2).sum(1).mean()))
        self.centroids = torch.stack(books)
        return self

    @torch.no_grad()
    def level_codes(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Centroid index per level [N, levels], before disambiguation."""
        if self.centroids is None:
            raise ConfigError("RQ-KMeans tokenizer: not fitted (call fit or load first)")
        residual = self._check(embeddings).clone()
        codes = []
        for centroids in self.centroids:
            cluster = _assign(residual, centroids, self.settings.balanced) if len(residual) else torch.zeros(
                0, dtype=torch.long)
            residual = residual - centroids[cluster]
            codes.append(cluster)
        return torch.stack(codes, 1)

    def encode(self, embeddings: np.ndarray | torch.Tensor) -> ItemCodes:
        """Unique codes for every item: `levels` centroid indices + 1 disambiguating position."""
        return disambiguate(self.level_codes(embeddings), (self.codebook_size,) * self.settings.levels)

    def save(self, path: str | Path) -> Path:
        """Write centroids and settings as one safetensors file (atomic)."""
        from safetensors.torch import save_file

        if self.centroids is None:
            raise ConfigError("RQ-KMeans tokenizer: not fitted, nothing to save")
        meta = {"format": FORMAT, "settings": json.dumps(asdict(self.settings)), "history": json.dumps(self.history)}
        target = Path(path)
        with writing(target), atomic_path(target) as tmp:
            save_file({"centroids": self.centroids.contiguous()}, str(tmp), metadata=meta)
        return target

    @classmethod
    def load(cls, path: str | Path) -> RQKMeansTokenizer:
        """Read a tokenizer written by `save`."""
        meta, tensors = read_safetensors(path, "RQ-KMeans tokenizer", FORMAT)
        tokenizer = cls(RQKMeansConfig(**json.loads(meta["settings"])))
        tokenizer.centroids = tensors["centroids"]
        tokenizer.history = json.loads(meta.get("history", "[]"))
        return tokenizer
