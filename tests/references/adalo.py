import math

import torch


class AdaLoRef:
    """AdaLo (Information Sciences 2024; formulas as cpuimage/AdaLo): loss-driven step size."""

    def __init__(self, betas, kappa, eps, weight_decay, mode="adversarial", weight_decay_mode="decoupled"):
        (self.b1, self.b2), self.kappa, self.eps, self.wd = betas, kappa, eps, weight_decay
        self.mode, self.wd_mode = mode, weight_decay_mode
        self.state = {}

    def step(self, p, g, loss):
        b1, b2, wd = self.b1, self.b2, self.wd
        if self.wd_mode == "l2":
            g = g + wd * p
        m = self.state.get("exp_avg", torch.zeros_like(p))
        e = self.state.get("loss_ema", torch.zeros((), dtype=p.dtype))
        m = b1 * m + (1 - b1) * g
        transformed = (math.tanh(-math.log1p(loss) * 0.5) + 1.0) * 0.5
        e = b2 * e + (1 - b2) * transformed
        self.state.update(exp_avg=m, loss_ema=e)
        level = e if self.mode == "adversarial" else 1 - e
        lr_t = max(float(level) / self.kappa, self.eps)
        if self.wd_mode == "decoupled":
            p.mul_(1 - lr_t * wd)
            p.sub_(lr_t * m)
        elif self.wd_mode == "cautious":  # arXiv 2510.12402: decay only where u and p agree in sign
            p.copy_(p - lr_t * (m + wd * torch.where(m * p >= 0, p, torch.zeros_like(p))))
        else:
            p.sub_(lr_t * m)
