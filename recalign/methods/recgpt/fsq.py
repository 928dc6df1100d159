"""FSQ item tokenizer: an item's text embedding -> 4 finite-scalar-quantised codes + 1 disambiguating code.

The embedding is standardised, cut into `n_chunks` equal chunks, and every chunk is quantised by one shared FSQ
(levels [8, 8, 8, 6, 5] -> 15,360 codes, `vector_quantize_pytorch.FSQ`). A small decoder reconstructs the embedding
from the quantised chunks (L1 loss), which trains the FSQ projection. Items that share all chunk codes get an extra
position numbering them, so every catalog item has a unique code (`codes.disambiguate`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recalign.errors import ConfigError, DataError, writing
from recalign.io import atomic_path
from recalign.methods.recgpt.codes import ItemCodes, disambiguate, read_safetensors

__all__ = ["FSQ_LEVELS", "FSQConfig", "ItemTokenizer", "fsq_basis"]

FSQ_LEVELS = (8, 8, 8, 6, 5)
FORMAT = "recalign.methods.recgpt.ItemTokenizer/1"


def fsq_basis(levels: tuple[int, ...]) -> torch.Tensor:
    """Mixed-radix place values of the FSQ index: [1, L0, L0*L1, ...] ([1, 8, 64, 512, 3072] for 8,8,8,6,5)."""
    return torch.cumprod(torch.tensor((1, *levels[:-1]), dtype=torch.long), 0)


@dataclass
class FSQConfig:
    """Tokenizer shape and training settings."""

    levels: tuple[int, ...] = FSQ_LEVELS
    n_chunks: int = 4
    hidden: int = 512  # decoder width
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        self.levels = tuple(int(v) for v in self.levels)
        if any(v < 3 for v in self.levels):  # level 2 needs FSQ's symmetric variant, which we do not use
            raise ConfigError(f"fsq.levels: every level must be >= 3, got {list(self.levels)}")
        for name in ("n_chunks", "hidden", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"fsq.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"fsq.lr: must be > 0, got {self.lr}")


class _Autoencoder(nn.Module):
    """Shared FSQ over the chunks and an MLP decoder from the quantised chunks back to the embedding."""

    def __init__(self, dim: int, settings: FSQConfig):
        super().__init__()
        from vector_quantize_pytorch import FSQ

        self.n_chunks, self.chunk = settings.n_chunks, dim // settings.n_chunks
        self.fsq = FSQ(levels=list(settings.levels), dim=self.chunk)
        self.decoder = nn.Sequential(nn.Linear(dim, settings.hidden), nn.GELU(), nn.Linear(settings.hidden, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction [B, dim] and FSQ indices [B, n_chunks] of standardised embeddings x [B, dim]."""
        quantised, indices = self.fsq(x.view(x.shape[0], self.n_chunks, self.chunk))
        return self.decoder(quantised.reshape(x.shape[0], -1)), indices.long()


class ItemTokenizer:
    """Text embeddings -> unique item codes (`ItemCodes`): fit on a catalog, encode any catalog."""

    def __init__(self, settings: FSQConfig | None = None):
        self.settings = settings or FSQConfig()
        self.model: _Autoencoder | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.history: list[float] = []  # mean L1 loss per epoch

    @property
    def codebook_size(self) -> int:
        """Codes per chunk position: the product of the levels (15,360 by default)."""
        return math.prod(self.settings.levels)

    def _check(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embeddings as finite float32 [N, d] with d divisible by n_chunks (and matching a fitted d)."""
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if x.dim() != 2 or x.shape[1] % self.settings.n_chunks:
            raise DataError(f"embeddings: expected [N, d] with d divisible by {self.settings.n_chunks}, "
                            f"got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise DataError("embeddings: contain NaN or infinite values")
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise DataError(f"embeddings: dimension {x.shape[1]} differs from the fitted {self.mean.shape[0]}")
        return x

    def fit(self, embeddings: np.ndarray | torch.Tensor) -> "ItemTokenizer":
        """Train FSQ projections and decoder with L1 reconstruction (seeded, deterministic on CPU)."""
        x = self._check(embeddings)
        if x.shape[0] == 0:
            raise DataError("embeddings: no items to fit the tokenizer on")
        s = self.settings
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        z = (x - self.mean) / self.std
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            self.model = _Autoencoder(x.shape[1], s)
        optimiser = torch.optim.Adam(self.model.parameters(), lr=s.lr)
        generator = torch.Generator().manual_seed(s.seed)
        self.model.train()
        self.history = []
        for _ in range(s.epochs):
            total = 0.0
            for batch in torch.randperm(len(z), generator=generator).split(s.batch_size):
                recon, _ = self.model(z[batch])
                loss = (recon - z[batch]).abs().mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(batch)
            self.history.append(total / len(z))
        self.model.eval()
        return self

    @torch.no_grad()
    def chunk_codes(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        """FSQ indices [N, n_chunks] in [0, codebook_size), before disambiguation."""
        if self.model is None:
            raise ConfigError("item tokenizer: not fitted (call fit or load first)")
        x = self._check(embeddings)
        z = (x - self.mean) / self.std
        return torch.cat([self.model(part)[1] for part in z.split(4096)]) if len(z) else torch.zeros(
            0, self.settings.n_chunks, dtype=torch.long)

    def encode(self, embeddings: np.ndarray | torch.Tensor) -> ItemCodes:
        """Unique codes for every item: n_chunks FSQ codes + 1 disambiguating position (collision rate kept)."""
        return disambiguate(self.chunk_codes(embeddings), (self.codebook_size,) * self.settings.n_chunks)

    def save(self, path: str | Path) -> Path:
        """Write weights, standardisation and settings as one safetensors file (atomic)."""
        from safetensors.torch import save_file

        if self.model is None:
            raise ConfigError("item tokenizer: not fitted, nothing to save")
        tensors = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({"mean": self.mean.contiguous(), "std": self.std.contiguous()})
        meta = {"format": FORMAT, "settings": json.dumps(asdict(self.settings)), "history": json.dumps(self.history)}
        target = Path(path)
        with writing(target), atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return target

    @classmethod
    def load(cls, path: str | Path) -> "ItemTokenizer":
        """Read a tokenizer written by `save`."""
        meta, tensors = read_safetensors(path, "item-tokenizer", FORMAT)
        tokenizer = cls(FSQConfig(**json.loads(meta["settings"])))
        tokenizer.mean, tokenizer.std = tensors.pop("mean"), tensors.pop("std")
        tokenizer.model = _Autoencoder(tokenizer.mean.shape[0], tokenizer.settings)
        tokenizer.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()})
        tokenizer.model.eval()
        tokenizer.history = json.loads(meta.get("history", "[]"))
        return tokenizer


@dataclass
class TokenizerReport:
    """Numbers worth printing about a tokenised catalog."""

    n_items: int
    collision_rate: float
    max_group: int
    codes_used: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, codes: ItemCodes, n_chunks: int = 4) -> "TokenizerReport":
        """Collision rate, largest shared-code group and distinct codes per chunk position."""
        used = [int(torch.unique(codes.codes[:, c]).numel()) for c in range(min(n_chunks, codes.n_positions))]
        return cls(codes.n_items, codes.collision_rate, codes.sizes[-1], used)
