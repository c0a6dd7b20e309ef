"""Self-supervised losses (small modules in the style of lightly).

Both take the projections of two or more augmented views of the same batch,
``z1, z2, ...: (n, d)``, where row ``i`` of every view comes from the same study, and
return a scalar tensor. With two views they are the published losses; more views of a
study per step (as in multi-crop SwAV / DINO) give more positive pairs per study, which is
what a small cohort is short of.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NTXentLoss", "VICRegLoss"]


def _check_views(zs: tuple[Tensor, ...], min_rows: int) -> None:
    if len(zs) < 2:
        raise ValueError(f"need at least two views, got {len(zs)}")
    z1 = zs[0]
    for z in zs[1:]:
        if z1.ndim != 2 or z.shape != z1.shape:
            raise ValueError(
                f"expected (n, d) tensors of the same shape, got {tuple(z1.shape)} and "
                f"{tuple(z.shape)}"
            )
    if z1.shape[0] < min_rows:
        raise ValueError(f"need a batch of at least {min_rows} rows, got {z1.shape[0]}")


class NTXentLoss(nn.Module):
    """Normalised-temperature cross entropy (SimCLR; Chen et al., 2020).

    ``forward(z1 (n, d), z2 (n, d)) -> ()``: the 2n projections are L2-normalised; for each
    one, its other view is the positive and the remaining ``2n - 2`` are negatives:
    ``mean_i -log(exp(s_i,p(i) / t) / sum_{k != i} exp(s_i,k / t))`` with cosine
    similarities ``s``. Needs ``n >= 2``.

    ``forward(z1, ..., zv)`` with ``v > 2`` views: each projection has ``v - 1`` positives
    (the other views of its study) and the term above is averaged over them (the
    multi-positive form of Khosla et al., 2020, with the study as the class).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        t = float(temperature)
        if not math.isfinite(t) or t <= 0.0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = t

    def forward(self, *zs: Tensor) -> Tensor:
        _check_views(zs, 2)
        v, n = len(zs), zs[0].shape[0]
        z = F.normalize(torch.cat(zs, dim=0).float(), dim=1)
        logits = (z @ z.T) / self.temperature  # (vn, vn)
        eye = torch.eye(v * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, float("-inf"))
        idx = torch.arange(n, device=z.device)
        if v == 2:
            return F.cross_entropy(logits, torch.cat([idx + n, idx]))
        study = idx.repeat(v)
        positive = (study[:, None] == study[None, :]) & ~eye
        log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        return -(log_p.masked_fill(~positive, 0.0).sum(dim=1) / (v - 1)).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class VICRegLoss(nn.Module):
    """Variance-invariance-covariance regularisation (Bardes et al., 2022); no negatives.

    ``forward(z1 (n, d), z2 (n, d)) -> ()`` =
    ``sim * mse(z1, z2) + var * (hinge(z1) + hinge(z2)) / 2 + cov * (c(z1) + c(z2))``
    where ``hinge`` is the mean of ``relu(1 - std)`` per dimension and ``c`` is the sum of
    squared off-diagonal covariances divided by ``d``. Needs ``n >= 2``. With ``v > 2``
    views: the mse averaged over all pairs of views, the hinge averaged over views and the
    covariance term ``2 / v`` times its sum over views, which is the mean of the two-view
    loss over all pairs of views.
    """

    def __init__(
        self, sim: float = 25.0, var: float = 25.0, cov: float = 1.0, eps: float = 1e-4
    ) -> None:
        super().__init__()
        for name, v in (("sim", sim), ("var", var), ("cov", cov)):
            if not math.isfinite(float(v)) or float(v) < 0.0:
                raise ValueError(f"{name} weight must be a finite number >= 0, got {v!r}")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.sim, self.var, self.cov, self.eps = float(sim), float(var), float(cov), float(eps)

    def _var_cov(self, z: Tensor) -> tuple[Tensor, Tensor]:
        n, d = z.shape
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + self.eps)
        var_loss = F.relu(1.0 - std).mean()
        c = (z.T @ z) / (n - 1)
        off = c - torch.diag(torch.diagonal(c))
        return var_loss, off.pow(2).sum() / d

    def forward(self, *zs: Tensor) -> Tensor:
        _check_views(zs, 2)
        z = [t.float() for t in zs]
        v = len(z)
        pairs = [(i, j) for i in range(v) for j in range(i + 1, v)]
        inv = sum(F.mse_loss(z[i], z[j]) for i, j in pairs) / len(pairs)
        var, cov = zip(*(self._var_cov(t) for t in z), strict=True)
        return self.sim * inv + self.var * sum(var) / v + self.cov * sum(cov) * (2 / v)

    def extra_repr(self) -> str:
        return f"sim={self.sim}, var={self.var}, cov={self.cov}"
