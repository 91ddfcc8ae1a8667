"""Dense feed-forward layer and stochastic depth.

timm's ``Mlp`` / ``DropPath`` with the same parameter names, so timm weights load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class Mlp(nn.Module):
    """Two-layer feed-forward: fc1 -> act -> drop -> fc2 -> drop.

    Args:
        in_features: input width.
        hidden_features: hidden width (``mlp_ratio * dim`` in a block).
        out_features: output width; defaults to ``in_features``.
        act_layer: activation class, instantiated without arguments.
        drop: dropout after the activation and after ``fc2``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def drop_path(x: Tensor, p: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p``, rescale the rest.

    Args:
        x: residual branch output, (B, ...).
        p: drop probability.
        training: identity when False.
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ..., 1)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (per-sample stochastic depth).

    Args:
        p: drop probability of a sample's residual branch.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, ...)."""
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        """Shown by ``print(module)``."""
        return f"p={self.p:g}"


__all__ = ["DropPath", "Mlp", "drop_path"]
