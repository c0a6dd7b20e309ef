"""Projection heads used only during self-supervised training (discarded afterwards)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """MLP ``(n, in_dim) -> (n, out)``: ``num_layers - 1`` blocks of Linear-BN-ReLU with
    width ``hidden``, then a final Linear (SimCLR uses 2 layers, VICReg 3).

    BatchNorm needs batches of at least 2 in training mode.
    """

    def __init__(self, in_dim: int, hidden: int, out: int, *, num_layers: int = 2) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("hidden", hidden), ("out", out)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = int(in_dim)
        for _ in range(int(num_layers) - 1):
            layers += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()]
            dim = int(hidden)
        layers.append(nn.Linear(dim, int(out)))
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.hidden, self.out = int(in_dim), int(hidden), int(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
