"""Self-supervised losses (small modules in the style of lightly).

Both take the projections of two augmented views of the same batch, ``z1, z2: (n, d)``,
where row ``i`` of ``z1`` and row ``i`` of ``z2`` come from the same study, and return a
scalar tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NTXentLoss", "VICRegLoss"]


def _check_pair(z1: Tensor, z2: Tensor, min_rows: int) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"expected two (n, d) tensors of the same shape, got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}"
        )
    if z1.shape[0] < min_rows:
        raise ValueError(f"need a batch of at least {min_rows} rows, got {z1.shape[0]}")


class NTXentLoss(nn.Module):
    """Normalised-temperature cross entropy (SimCLR; Chen et al., 2020).

    ``forward(z1 (n, d), z2 (n, d)) -> ()``: the 2n projections are L2-normalised; for each
    one, its other view is the positive and the remaining ``2n - 2`` are negatives:
    ``mean_i -log(exp(s_i,p(i) / t) / sum_{k != i} exp(s_i,k / t))`` with cosine
    similarities ``s``. Needs ``n >= 2``.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        t = float(temperature)
        if not math.isfinite(t) or t <= 0.0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = t

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        _check_pair(z1, z2, 2)
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)
        logits = (z @ z.T) / self.temperature  # (2n, 2n)
        eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, float("-inf"))
        idx = torch.arange(n, device=z.device)
        targets = torch.cat([idx + n, idx])
        return F.cross_entropy(logits, targets)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class VICRegLoss(nn.Module):
    """Variance-invariance-covariance regularisation (Bardes et al., 2022); no negatives.

    ``forward(z1 (n, d), z2 (n, d)) -> ()`` =
    ``sim * mse(z1, z2) + var * (hinge(z1) + hinge(z2)) / 2 + cov * (c(z1) + c(z2))``
    where ``hinge`` is the mean of ``relu(1 - std)`` per dimension and ``c`` is the sum of
    squared off-diagonal covariances divided by ``d``. Needs ``n >= 2``.
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

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        _check_pair(z1, z2, 2)
        z1, z2 = z1.float(), z2.float()
        inv = F.mse_loss(z1, z2)
        v1, c1 = self._var_cov(z1)
        v2, c2 = self._var_cov(z2)
        return self.sim * inv + self.var * (v1 + v2) / 2 + self.cov * (c1 + c2)

    def extra_repr(self) -> str:
        return f"sim={self.sim}, var={self.var}, cov={self.cov}"
