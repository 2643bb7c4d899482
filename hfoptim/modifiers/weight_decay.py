"""Applying the update with weight decay.

* ``decoupled`` (AdamW, arXiv 1711.05101): ``p <- p - lr (u + wd p)``
* ``cautious`` (arXiv 2510.12402): ``p <- p - lr (u + wd 1[u p >= 0] p)``
* ``proximal`` (Adan's default): ``p <- (p - lr u) / (1 + lr wd)``
* ``l2`` (coupled): ``g <- g + wd p`` before the rule, then ``p <- p - lr u``
"""

from __future__ import annotations

import torch

from ..core.tensorlist import TensorList

MODES = ("decoupled", "cautious", "proximal", "l2")


def add_l2(g: TensorList, p: TensorList, wd: float) -> TensorList:
    """Coupled weight decay: a new gradient list ``g + wd p``."""
    return g + p * wd


def _scaled(u: TensorList, lr) -> TensorList:
    """``lr * u`` for a scalar, per-tensor numbers, or per-tensor 0-d tensors."""
    return u * lr


def apply_update(p: TensorList, u: TensorList, lr, wd: float, mode: str) -> None:
    """Write ``p <- step(p, u)`` in place (``p`` is the compute-dtype parameter list)."""
    if mode == "cautious" and wd != 0:
        decay = TensorList([torch.where(ui * pi >= 0, pi, torch.zeros_like(pi)) for ui, pi in zip(u, p)], p.foreach)
        u = u + decay * wd
    elif mode == "decoupled" and wd != 0:
        p.mul_(_one_minus(lr, wd))
    if isinstance(lr, (int, float)):
        p.add_(u, alpha=-lr)  # one fused pass, no lr * u temporary
    else:
        p.sub_(_scaled(u, lr))
    if mode == "proximal" and wd != 0:
        p.div_(_one_plus(lr, wd))


def _one_minus(lr, wd):
    if isinstance(lr, list):
        return [1 - x * wd for x in lr]
    return 1 - lr * wd


def _one_plus(lr, wd):
    if isinstance(lr, list):
        return [1 + x * wd for x in lr]
    return 1 + lr * wd
