"""Train a CTR backbone: BCE + AdamW, early stop and the (batch x lr) grid chosen on VALIDATION AUC, test scored once."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from recalign.errors import ConfigError, DataError
from recalign.methods.trackrec.ctr.data import Impressions, to_batch
from recalign.methods.trackrec.ctr.dcn import DCNv2
from recalign.methods.trackrec.ctr.deepfm import DeepFM
from recalign.methods.trackrec.ctr.din import DIN
from recalign.threads import torch_threads
from recalign.training import EarlyStopping

__all__ = ["BACKBONES", "CTRConfig", "CTRResult", "make_backbone", "ctr_metrics", "predict", "train_one", "fit_ctr"]

BACKBONES: dict[str, type[nn.Module]] = {"din": DIN, "deepfm": DeepFM, "dcnv2": DCNv2}


@dataclass(frozen=True)
class CTRConfig:
    """Training settings (KAR's defaults: embedding 32, MLP 200-80, <= 20 epochs, patience 3, no weight decay)."""

    embed_dim: int = 32
    epochs: int = 20
    patience: int = 3
    batch_sizes: tuple[int, ...] = (256,)
    lrs: tuple[float, ...] = (1e-3,)
    weight_decay: float = 0.0
    eval_batch_size: int = 8192
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("embed_dim", "epochs", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ctr.{name}: expected a positive integer, got {getattr(self, name)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"ctr.batch_sizes: expected positive integers, got {list(self.batch_sizes)}")
        if not self.lrs or min(self.lrs) < 0 or not all(math.isfinite(lr) for lr in self.lrs):
            raise ConfigError(f"ctr.lrs: expected finite learning rates >= 0, got {list(self.lrs)}")
        if self.weight_decay < 0:
            raise ConfigError(f"ctr.weight_decay: expected >= 0, got {self.weight_decay}")


@dataclass
class CTRResult:
    """The chosen model, its validation and test metrics, and every grid point's validation curve."""

    model: nn.Module
    chosen: dict
    valid: dict
    test: dict
    grid: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready: chosen grid point and epoch, validation and test metrics, the grid's curves."""
        return {"chosen": self.chosen, "valid": self.valid, "test": self.test, "grid": self.grid}


def make_backbone(name: str, impressions: Impressions, knowledge_dim: int | None = None,
                  embed_dim: int = 32) -> nn.Module:
    """A fresh backbone sized for `impressions` (items, user features), with HEA when `knowledge_dim` is given."""
    if name not in BACKBONES:
        raise ConfigError(f"ctr.backbone: unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    return BACKBONES[name](impressions.n_items, impressions.feature_sizes, embed_dim=embed_dim,
                           knowledge_dim=knowledge_dim)


def ctr_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """AUC and LogLoss (scikit-learn) and ACC at 0.5; AUC is NaN when only one class is present."""
    from sklearn.metrics import log_loss, roc_auc_score

    labels = np.asarray(labels, dtype=np.float64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")
    return {"auc": auc, "logloss": float(log_loss(labels, probs, labels=[0, 1])),
            "acc": float(((probs >= 0.5) == (labels == 1)).mean()), "rows": int(len(labels))}


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, torch.Tensor], batch_size: int = 8192) -> np.ndarray:
    """Click probabilities for every row of `batch`."""
    model.eval()
    n = len(batch["label"])
    out = [torch.sigmoid(model(_rows(batch, slice(start, start + batch_size))))
           for start in range(0, n, batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def _rows(batch: dict[str, torch.Tensor], rows: slice | torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in batch.items()}


def train_one(model: nn.Module, train: dict[str, torch.Tensor], valid: dict[str, torch.Tensor], batch_size: int,
              lr: float, settings: CTRConfig, generator: torch.Generator) -> dict:
    """Train with early stopping on validation AUC; the model ends at its best epoch. Returns that epoch and the curve.

    `EarlyStopping`: an epoch is better only with a strictly higher AUC; training stops after `patience` epochs in a
    row without one. Epoch 0 is the initial weights (kept when no epoch's AUC is a number, e.g. one-class labels).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    labels = valid["label"].numpy()
    stopper = EarlyStopping(settings.patience)
    stopper.best_epoch, stopper.best_state = 0, copy.deepcopy(model.state_dict())
    curve = []
    n = len(train["label"])
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        total = _train_epoch(model, train, batch_size, optimizer, loss_fn, generator)
        metrics = ctr_metrics(labels, predict(model, valid, settings.eval_batch_size))
        curve.append({"epoch": epoch, "loss": total / n, "valid_auc": metrics["auc"],
                      "valid_logloss": metrics["logloss"], "seconds": time.perf_counter() - started})
        if stopper.update(metrics["auc"], epoch, model.state_dict()):
            break
    model.load_state_dict(stopper.best_state)
    return {"best_epoch": stopper.best_epoch, "valid_auc": stopper.best, "curve": curve}


def _train_epoch(model: nn.Module, train: dict[str, torch.Tensor], batch_size: int, optimizer, loss_fn,
                 generator: torch.Generator) -> float:
    """One epoch of BCE steps over a seeded order of the train rows; returns the summed loss (mean x rows)."""
    model.train()
    n = len(train["label"])
    order = torch.randperm(n, generator=generator)
    total = 0.0
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        chunk = _rows(train, rows)
        loss = loss_fn(model(chunk), chunk["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(rows)
    return total


def fit_ctr(backbone: str, parts: dict[str, Impressions], settings: CTRConfig = CTRConfig(),
            knowledge: dict[str, np.ndarray] | None = None,
            progress: Callable[[str], None] | None = None) -> CTRResult:
    """Train `backbone` on every (batch size, lr) grid point; keep the best on validation AUC; score test once.

    parts: "train", "valid", "test" impressions (a user split). knowledge: the same keys -> [N, 2, d] float32
    prompt/CoT vectors (one row per impression), or None for the plain backbone.
    """
    for name in ("train", "valid", "test"):
        if name not in parts or not len(parts[name]):
            raise DataError(f"the CTR split has no '{name}' impressions", field=name)
    if len(np.unique(parts["valid"].label)) < 2:
        raise DataError("the validation impressions hold only one label: AUC (the selection metric) is undefined",
                        field="valid")
    knowledge_dim = None
    if knowledge is not None:
        shapes = {name: knowledge[name].shape for name in ("train", "valid", "test")}
        if len({s[1:] for s in shapes.values()}) != 1 or len(shapes["train"]) != 3 or shapes["train"][1] != 2:
            raise DataError(f"knowledge vectors must be [N, 2, d] in every part, got {shapes}")
        knowledge_dim = shapes["train"][2]
    batches = {name: to_batch(parts[name], knowledge[name] if knowledge is not None else None)
               for name in ("train", "valid", "test")}
    with torch_threads(settings.threads):
        best_model, best_point, grid = None, None, []
        for batch_size in settings.batch_sizes:
            for lr in settings.lrs:
                torch.manual_seed(settings.seed)  # the same initial weights and batch order at every grid point
                generator = torch.Generator().manual_seed(settings.seed)
                model = make_backbone(backbone, parts["train"], knowledge_dim, settings.embed_dim)
                outcome = train_one(model, batches["train"], batches["valid"], batch_size, lr, settings, generator)
                point = {"batch_size": batch_size, "lr": lr, **outcome}
                grid.append(point)
                if progress is not None:
                    progress(f"{backbone} batch {batch_size} lr {lr:g}: valid AUC {outcome['valid_auc']:.4f} "
                             f"at epoch {outcome['best_epoch']}")
                if best_point is None or outcome["valid_auc"] > best_point["valid_auc"]:
                    best_model, best_point = model, point
        valid = ctr_metrics(batches["valid"]["label"].numpy(), predict(best_model, batches["valid"]))
        test = ctr_metrics(batches["test"]["label"].numpy(), predict(best_model, batches["test"]))  # scored once
    chosen = {"backbone": backbone, "knowledge": knowledge is not None, "batch_size": best_point["batch_size"],
              "lr": best_point["lr"], "epoch": best_point["best_epoch"], "selected_on": "valid_auc"}
    return CTRResult(model=best_model, chosen=chosen, valid=valid, test=test, grid=grid)
