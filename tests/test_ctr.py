"""CTR backbones learn planted rules, the HEA adaptor's experts and gates, and selection on validation only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recalign.methods.trackrec.ctr.data import Impressions, to_batch
from recalign.methods.trackrec.ctr.hea import HEA
from recalign.methods.trackrec.ctr.train import BACKBONES, CTRConfig, ctr_metrics, fit_ctr, make_backbone, predict
from recalign.errors import ConfigError, DataError

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

N_ITEMS = 40


def _impressions(n: int, seed: int, flip: bool = False) -> Impressions:
    """Synthetic impressions whose label is planted: 1 iff the item's parity matches the user's feature (1 or 2).

    History items have the user's preferred parity too, so a model can read the rule from either.
    """
    rng = np.random.default_rng(seed)
    feature = rng.integers(1, 3, n)
    item = rng.integers(0, N_ITEMS, n)
    label = ((item % 2) == (feature - 1)).astype(np.float32)
    if flip:
        label = 1.0 - label
    history = 2 * rng.integers(0, N_ITEMS // 2, (n, 5)) + (feature - 1)[:, None]
    history[:, :2] = np.where(rng.random((n, 2)) < 0.5, -1, history[:, :2])  # some padding
    return Impressions(user=np.arange(n), item=item, label=label, rating=label * 4 + 1,
                       timestamp=np.zeros(n, dtype=np.int64), history=history.astype(np.int64),
                       history_rating=np.where(history >= 0, 4.0, 0.0).astype(np.float32),
                       user_features=feature[:, None].astype(np.int64), feature_names=("gender",),
                       feature_sizes=(3,), n_users=n, n_items=N_ITEMS)


def _parts(flip_test: bool = False) -> dict[str, Impressions]:
    return {"train": _impressions(1500, 0), "valid": _impressions(400, 1), "test": _impressions(400, 2, flip_test)}


QUICK = CTRConfig(embed_dim=8, epochs=8, patience=3, batch_sizes=(64,), lrs=(1e-2,), seed=0)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_each_backbone_learns_a_planted_rule(backbone):
    result = fit_ctr(backbone, _parts(), QUICK)
    assert result.test["auc"] > 0.9, result.test
    assert result.test["logloss"] < 0.5


def _knowledge(parts: dict[str, Impressions], seed: int) -> dict[str, np.ndarray]:
    """[N, 2, 6] vectors: the CoT tower's first coordinate is +-1 by a hidden label; everything else is noise."""
    out = {}
    for name, part in parts.items():
        rng = np.random.default_rng(seed + len(name))
        vectors = rng.normal(size=(len(part), 2, 6)).astype(np.float32)
        vectors[:, 1, 0] = 2.0 * part.rating - 1.0
        out[name] = vectors
    return out


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_each_backbone_reads_the_knowledge_vector_through_hea(backbone):
    """Labels depend on the knowledge only (random item/feature): +KAR learns them, the plain backbone cannot."""
    parts = {}
    for name, (n, seed) in {"train": (1500, 10), "valid": (400, 11), "test": (400, 12)}.items():
        base = _impressions(n, seed)
        hidden = np.random.default_rng(seed + 100).integers(0, 2, n).astype(np.float32)
        parts[name] = Impressions(**{**base.__dict__, "label": hidden, "rating": hidden})
    knowledge = _knowledge(parts, 5)
    with_kar = fit_ctr(backbone, parts, QUICK, knowledge=knowledge)
    plain = fit_ctr(backbone, parts, CTRConfig(embed_dim=8, epochs=3, batch_sizes=(64,), lrs=(1e-2,)))
    assert with_kar.test["auc"] > 0.9 and with_kar.chosen["knowledge"] is True
    assert plain.test["auc"] < 0.65


def test_hea_gates_sum_to_one_and_output_is_64_wide():
    torch.manual_seed(0)
    hea = HEA(input_dim=12)
    knowledge = torch.randn(5, 2, 12)
    gates = hea.gates(knowledge)
    assert gates.shape == (5, 2, 7)  # 2 shared + 5 own experts per tower
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 2))
    assert (gates > 0).all()
    assert hea(knowledge).shape == (5, 64) and hea.output_dim == 64


def test_hea_mixes_shared_and_own_experts_of_each_tower():
    """Forward equals the per-expert loop: tower t mixes shared experts 0, 1 and its own block of 5."""
    torch.manual_seed(1)
    hea = HEA(input_dim=4, hidden=6, out_dim=3)
    assert hea.expert_index.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 7, 8, 9, 10, 11]]
    x = torch.randn(3, 2, 4)
    expected = []
    for t in range(2):
        weights = torch.softmax(x[:, t] @ hea.gate[t].weight.T + hea.gate[t].bias, dim=-1)
        mixed = torch.zeros(3, 3)
        for slot, e in enumerate(hea.expert_index[t].tolist()):
            out = torch.relu(x[:, t] @ hea.w1[e] + hea.b1[e]) @ hea.w2[e] + hea.b2[e]
            mixed += weights[:, slot:slot + 1] * out
        expected.append(mixed)
    torch.testing.assert_close(hea(x), torch.cat(expected, dim=1))
    with pytest.raises(ValueError, match="knowledge"):
        hea(torch.randn(3, 3, 4))


def test_grid_point_is_chosen_on_validation_when_test_disagrees():
    """Test labels are the planted rule flipped: test prefers the untrained lr=0 point, validation the trained one."""
    settings = CTRConfig(embed_dim=8, epochs=4, patience=4, batch_sizes=(64,), lrs=(0.0, 1e-2), seed=0)
    result = fit_ctr("deepfm", _parts(flip_test=True), settings)
    by_lr = {point["lr"]: point for point in result.grid}
    assert by_lr[1e-2]["valid_auc"] > 0.9 and by_lr[0.0]["valid_auc"] < 0.75
    assert result.chosen["lr"] == 1e-2 and result.chosen["selected_on"] == "valid_auc"
    assert result.test["auc"] < 0.1  # what validation's choice scores on the flipped test: selection never saw test
    assert result.valid["auc"] == pytest.approx(by_lr[1e-2]["valid_auc"])
    # the lr=0 point (the seeded initial weights, never updated) scores far better on this test set
    torch.manual_seed(0)
    untrained = make_backbone("deepfm", _parts()["train"], embed_dim=8)
    test = _parts(flip_test=True)["test"]
    assert ctr_metrics(test.label, predict(untrained, to_batch(test)))["auc"] > result.test["auc"] + 0.3


def test_epoch_is_chosen_on_validation_and_early_stopping_restores_it():
    settings = CTRConfig(embed_dim=8, epochs=30, patience=2, batch_sizes=(64,), lrs=(3e-2,), seed=0)
    result = fit_ctr("din", _parts(flip_test=True), settings)
    curve = result.grid[0]["curve"]
    aucs = [row["valid_auc"] for row in curve]
    best = int(np.argmax(aucs)) + 1
    assert result.chosen["epoch"] == best == result.grid[0]["best_epoch"]
    assert len(curve) == min(30, best + 2)  # stopped after `patience` epochs without a better validation AUC
    assert result.valid["auc"] == pytest.approx(aucs[best - 1])  # the restored model is the best epoch's


def test_ctr_metrics_by_hand():
    metrics = ctr_metrics(np.array([0, 1, 1, 0]), np.array([0.2, 0.8, 0.4, 0.6]))
    assert metrics["auc"] == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs are ordered
    expected = -(np.log(0.8) + np.log(0.8) + np.log(0.4) + np.log(0.4)) / 4
    assert metrics["logloss"] == pytest.approx(expected) and metrics["acc"] == 0.5


def test_bad_settings_and_inputs_are_project_errors():
    with pytest.raises(ConfigError, match="unknown backbone 'dien'"):
        make_backbone("dien", _impressions(10, 0))
    with pytest.raises(ConfigError, match="ctr.lrs"):
        CTRConfig(lrs=(-1.0,))
    with pytest.raises(ConfigError, match="ctr.batch_sizes"):
        CTRConfig(batch_sizes=())
    parts = _parts()
    one_class = _impressions(50, 3)
    parts["valid"] = one_class.take(np.flatnonzero(one_class.label == 1))
    with pytest.raises(DataError, match="only one label"):
        fit_ctr("din", parts, QUICK)
    with pytest.raises(DataError, match=r"\[N, 2, d\]"):
        fit_ctr("din", _parts(), QUICK, knowledge={k: np.zeros((len(v), 3, 4), np.float32)
                                                   for k, v in _parts().items()})
