"""focal_loss (defectlab.losses) against values computed by hand from FL(p_t) = -α_t (1-p_t)^γ log p_t."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from defectlab.losses import focal_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_sigmoid_layout_matches_hand_computed_values():
    logits = torch.tensor([[0.0, 2.0, -1.0]]).view(1, 1, 3)
    target = torch.tensor([[1.0, 0.0, 1.0]]).view(1, 3)
    # p_t = 0.5, 1 - σ(2) = 0.119203, σ(-1) = 0.268941
    expected = [0.25 * math.log(2.0),
                -(sigmoid(2.0) ** 2) * math.log(1 - sigmoid(2.0)),
                -((1 - sigmoid(-1.0)) ** 2) * math.log(sigmoid(-1.0))]
    assert expected[0] == pytest.approx(0.1732868, abs=1e-6)
    assert expected[1] == pytest.approx(1.6500782, abs=1e-6)
    got = focal_loss(logits, target, gamma=2.0, reduction="none")
    assert got.shape == (1, 1, 3)
    assert torch.allclose(got.flatten(), torch.tensor(expected), atol=1e-6)
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert focal_loss(logits, target, gamma=2.0, reduction="sum").item() == pytest.approx(sum(expected), abs=1e-6)


def test_softmax_layout_matches_hand_computed_values_and_alpha():
    # two pixels, two classes: logits (1, 2, 1, 2)
    logits = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).view(1, 2, 1, 2)   # pixel 0: (1, 0); pixel 1: (0, 3)
    target = torch.tensor([[[0, 1]]])
    p0 = math.exp(1) / (math.exp(1) + 1)            # pixel 0, true class 0
    p1 = math.exp(3) / (math.exp(3) + 1)            # pixel 1, true class 1
    fl = [-(1 - p0) ** 2 * math.log(p0), -(1 - p1) ** 2 * math.log(p1)]
    got = focal_loss(logits, target, gamma=2.0, reduction="none")
    assert got.shape == (1, 1, 2)
    assert torch.allclose(got.flatten(), torch.tensor(fl), atol=1e-6)
    weighted = focal_loss(logits, target, gamma=2.0, alpha=0.25, reduction="none").flatten()
    assert torch.allclose(weighted, torch.tensor([0.75 * fl[0], 0.25 * fl[1]]), atol=1e-6)
    # the binary sigmoid layout with the same probabilities gives the same numbers
    sig = focal_loss(torch.tensor([[[[-1.0, 3.0]]]]), target.float(), gamma=2.0, reduction="none").flatten()
    assert torch.allclose(sig, torch.tensor(fl), atol=1e-6)


def test_gamma_zero_is_cross_entropy_and_gamma_downweights_easy_pixels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=gen)
    target = torch.randint(3, (2, 4, 4), generator=gen)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target), atol=1e-6)
    # an easy pixel (p_t = 0.95) loses far more weight than a hard one (p_t = 0.2) when γ grows
    easy = focal_loss(torch.tensor([[[math.log(19.0)]]]), torch.tensor([[[1.0]]]), gamma=2.0)
    hard = focal_loss(torch.tensor([[[math.log(0.25)]]]), torch.tensor([[[1.0]]]), gamma=2.0)
    ce_easy, ce_hard = -math.log(0.95), -math.log(0.2)
    assert easy.item() == pytest.approx(0.05 ** 2 * ce_easy, rel=1e-5)
    assert hard.item() == pytest.approx(0.8 ** 2 * ce_hard, rel=1e-5)


def test_gradient_and_errors():
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    target = torch.ones(1, 2, 2, dtype=torch.long)
    focal_loss(logits, target).backward()
    assert (logits.grad[:, 1] < 0).all() and (logits.grad[:, 0] > 0).all()   # pushes towards the true class
    with pytest.raises(ValueError):
        focal_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2), alpha=0.5)
    with pytest.raises(ValueError):
        focal_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2), reduction="max")
