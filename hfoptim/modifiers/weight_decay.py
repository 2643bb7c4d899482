"""Applying the update with weight decay.

* ``decoupled`` (AdamW, arXiv 1711.05101): ``p <- p - lr (u + wd p)``
* ``cautious`` (arXiv 2510.12402): ``p <- p - lr (u + wd 1[u p >= 0] p)``
* ``proximal`` (Adan's default): ``p <- (p - lr u) / (1 + lr wd)``
* ``l2`` (coupled): ``g <- g + wd p`` before the rule, then ``p <- p - lr u``
* ``stable`` (AdamS, Xie et al., NeurIPS 2023, arXiv 2011.11152; zeke-xie/stable-weight-decay-
  regularization ``swd_optim/adams.py``): decoupled with the strength divided by the root of the
  mean bias-corrected second moment over ALL the optimizer's parameters (every group, every
  element): ``p <- p (1 - lr wd / sqrt(v_bar)) - lr u``, ``v_bar = sum_p sum(v_hat_p) / sum_p numel(p)``
  with ``v_hat`` the second moment the rule divides by in this step (after its update), no eps
  (as the authors' code). Any rule that divides by a second moment (``Rule.preconditioned``). The
  engine advances every bucket first, then applies the updates (the update directions, and the
  fp32 working copies of bf16/fp16 parameters, are held until then: about 4 more bytes per
  parameter at the peak).
* ``cpr`` (constrained parameter regularization, :mod:`hfoptim.modifiers.cpr`): no decay here;
  a per-tensor constraint applied after the update
"""

from __future__ import annotations

import torch

from ..core.tensorlist import TensorList

MODES = ("decoupled", "cautious", "proximal", "l2", "stable", "cpr")


def stable_scale(contexts: list) -> float:
    """``1 / sqrt(v_bar)`` for stable weight decay, from the sums of ``v_hat`` each context's
    preconditioner recorded (whole-tensor sums: exact when the tensors are sharded, and the same
    on every process)."""
    total, numel = 0.0, 0
    for ctx in contexts:
        sums = ctx.second_moment_sums
        if sums is None or len(sums) != len(ctx.views):
            raise RuntimeError(
                "weight_decay_mode='stable' needs the rule to divide by its second moment through the step context "
                "(ctx.precondition / ctx.adam_direction) once per step"
            )
        if any(x.is_meta for x in sums):
            return 1.0  # meta copies (a memory estimate): no values to average, any scale will do
        if sums:  # one host sync per bucket, not per tensor
            total += float(torch.stack([x.reshape(()).to(torch.float64) for x in sums]).sum())
        numel += sum(ctx.numel(i) for i in range(len(ctx.views)))
    if numel == 0:
        return 0.0
    mean = total / numel
    if not mean > 0:
        raise RuntimeError(
            f"weight_decay_mode='stable': the mean second moment over all parameters is {mean} (all gradients "
            f"zero so far), and stable weight decay divides by its square root"
        )
    return mean**-0.5


def add_l2(g: TensorList, p: TensorList, wd: float) -> TensorList:
    """Coupled weight decay: a new gradient list ``g + wd p``."""
    return g + p * wd


def _scaled(u: TensorList, lr) -> TensorList:
    """``lr * u`` for a scalar, per-tensor numbers, or per-tensor 0-d tensors."""
    return u * lr


def apply_update(p: TensorList, u: TensorList, lr, wd: float, mode: str, scales: list | None = None) -> None:
    """Write ``p <- step(p, u)`` in place (``p`` is the compute-dtype parameter list); with
    ``scales`` (a 0-d factor per tensor, LAMB's trust ratio) the update is ``lr s u``, taken in
    the same pass."""
    if mode == "cautious" and wd != 0:
        decay = TensorList([torch.where(ui * pi >= 0, pi, torch.zeros_like(pi)) for ui, pi in zip(u, p)], p.foreach)
        u = u + decay * wd
    elif mode == "decoupled" and wd != 0:
        p.mul_(_one_minus(lr, wd))
    if scales is not None:
        lrs = lr if isinstance(lr, list) else [lr] * len(scales)
        for pi, ui, si, lri in zip(p, u, scales, lrs):
            pi.addcmul_(ui, si * -lri)  # one pass; the factor is a 0-d tensor
    elif isinstance(lr, (int, float)):
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
