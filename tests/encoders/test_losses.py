"""NT-Xent, VICReg and the projection head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from encoders.heads import ProjectionHead
from encoders.losses import NTXentLoss, VICRegLoss


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ntxent_identical_views_lower_than_random() -> None:
    loss = NTXentLoss(temperature=0.1)
    z = _randn(16, 32)
    same = loss(z, z.clone())
    rand = loss(z, _randn(16, 32, seed=1))
    assert torch.isfinite(same) and torch.isfinite(rand)
    assert same < rand


def test_ntxent_matches_hand_computation() -> None:
    z1 = np.array([[1.0, 0.0], [0.0, 1.0]])
    z2 = np.array([[0.6, 0.8], [1.0, 1.0]])
    t = 0.5
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / t
    pos = {0: 2, 1: 3, 2: 0, 3: 1}
    terms = []
    for i in range(4):
        denom = sum(math.exp(s[i, k]) for k in range(4) if k != i)
        terms.append(-math.log(math.exp(s[i, pos[i]]) / denom))
    expected = sum(terms) / 4
    got = NTXentLoss(temperature=t)(torch.tensor(z1), torch.tensor(z2)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_ntxent_three_views_matches_hand_computation() -> None:
    """Each projection's positives are the other views of its study; the -log softmax is
    averaged over them, then over all 3n projections."""
    zs = [_randn(3, 4, seed=s) for s in (0, 1, 2)]
    t = 0.2
    z = torch.cat(zs).double()
    z = (z / z.norm(dim=1, keepdim=True)).numpy()
    s = z @ z.T / t
    terms = []
    for i in range(9):
        denom = sum(math.exp(s[i, k]) for k in range(9) if k != i)
        positives = [k for k in range(9) if k != i and k % 3 == i % 3]
        terms.append(sum(-math.log(math.exp(s[i, p]) / denom) for p in positives) / 2)
    got = NTXentLoss(temperature=t)(*zs).item()
    assert got == pytest.approx(sum(terms) / 9, rel=1e-5)
    # the order of the views does not matter
    assert NTXentLoss(temperature=t)(zs[2], zs[0], zs[1]).item() == pytest.approx(got, rel=1e-6)
    with pytest.raises(ValueError, match="two views"):
        NTXentLoss()(zs[0])


def test_vicreg_more_views_is_the_mean_of_the_pairwise_losses() -> None:
    loss = VICRegLoss()
    a, b, c = (_randn(16, 8, seed=s) for s in (4, 5, 6))
    pairs = (loss(a, b) + loss(a, c) + loss(b, c)) / 3
    assert loss(a, b, c).item() == pytest.approx(pairs.item(), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        loss(a, b, _randn(16, 7))


@pytest.mark.parametrize("t", [0, -0.1, float("nan"), float("inf")])
def test_ntxent_invalid_temperature(t: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=t)


def test_ntxent_shape_errors() -> None:
    loss = NTXentLoss()
    with pytest.raises(ValueError, match="same shape"):
        loss(_randn(4, 8), _randn(4, 7))
    with pytest.raises(ValueError, match="same shape"):
        loss(_randn(4), _randn(4))
    with pytest.raises(ValueError, match="at least 2"):
        loss(_randn(1, 8), _randn(1, 8))


def test_vicreg_finite_and_lower_for_aligned_views() -> None:
    loss = VICRegLoss()
    z = _randn(32, 16)
    aligned = loss(z, z + 0.01 * _randn(32, 16, seed=2))
    rand = loss(z, _randn(32, 16, seed=3))
    assert torch.isfinite(aligned) and torch.isfinite(rand)
    assert aligned < rand


def test_vicreg_decreases_when_optimised() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(8, 32, 16)
    x = _randn(32, 8)
    loss_fn = VICRegLoss()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        v1 = x + 0.1 * torch.randn_like(x)
        v2 = x + 0.1 * torch.randn_like(x)
        loss = loss_fn(head(v1), head(v2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_vicreg_invalid_weights() -> None:
    with pytest.raises(ValueError, match="var"):
        VICRegLoss(var=-1)
    with pytest.raises(ValueError, match="at least 2"):
        VICRegLoss()(_randn(1, 4), _randn(1, 4))


def test_projection_head() -> None:
    head = ProjectionHead(16, 32, 8)
    assert head(_randn(4, 16)).shape == (4, 8)
    assert ProjectionHead(16, 32, 8, num_layers=3)(_randn(4, 16)).shape == (4, 8)
    assert ProjectionHead(16, 32, 8, num_layers=1)(_randn(1, 16)).shape == (1, 8)
    with pytest.raises(ValueError, match="hidden"):
        ProjectionHead(16, 0, 8)
