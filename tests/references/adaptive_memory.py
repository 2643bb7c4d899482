"""Adaptive memory momentum (Topollai & Choromanska, arXiv 2510.04988): AM-SGD and AM-AdamW.

The momentum step as the paper states it, d = ((beta_t + lam) d + (1 - beta_t) g) / (1 + lam),
with beta_t the minimiser over [0, 1] of ||g + lam d + beta (d - g)||^2: the dual of the proximal
step on the larger of the gradient plane and the memory plane (derived in
hfoptim/rules/adaptive_memory.py; the paper's own formula was not reachable). One tensor, float64.
"""

import torch


def beta_t(g: torch.Tensor, d: torch.Tensor, lam: float) -> float:
    """The closed-form minimiser; 0 with no memory yet (d = 0) or when g = d."""
    diff = g - d
    den = float((diff * diff).sum())
    if den == 0.0 or float((d * d).sum()) == 0.0:
        return 0.0
    return min(1.0, max(0.0, float(((g + lam * d) * diff).sum()) / den))


class AMSGDRef:
    """AM-SGD: d_t as above, p <- p - lr d_t; weight decay coupled (g + wd p), as SGD."""

    def __init__(self, lr, weight_decay=0.0, am_lambda=0.0):
        self.lr, self.wd, self.lam = lr, weight_decay, am_lambda
        self.state = {}
        self.betas = []

    def step(self, p, g):
        g = g + self.wd * p
        d = self.state.get("exp_avg", torch.zeros_like(p))
        b = beta_t(g, d, self.lam)
        self.betas.append(b)
        d = ((b + self.lam) * d + (1 - b) * g) / (1 + self.lam)
        self.state["exp_avg"] = d
        p -= self.lr * d


class AMAdamWRef:
    """AM-AdamW: the memory d as above (no bias correction), v Adam's, decoupled weight decay."""

    def __init__(self, lr, betas, eps, weight_decay, am_lambda=0.0):
        self.lr, self.b2, self.eps, self.wd, self.lam = lr, betas[1], eps, weight_decay, am_lambda
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        d = self.state.get("exp_avg", torch.zeros_like(p))
        v = self.state.get("exp_avg_sq", torch.zeros_like(p))
        b = beta_t(g, d, self.lam)
        d = ((b + self.lam) * d + (1 - b) * g) / (1 + self.lam)
        v = self.b2 * v + (1 - self.b2) * g * g
        self.state.update(exp_avg=d, exp_avg_sq=v)
        v_hat = v / (1 - self.b2**self.t)
        p -= self.lr * (d / (v_hat.sqrt() + self.eps) + self.wd * p)


class SGDRef:
    """SGD with momentum in the moving-average form, bias-corrected: p <- p - lr d_t / (1 - mu^t)."""

    def __init__(self, lr, momentum, weight_decay=0.0):
        self.lr, self.mu, self.wd = lr, momentum, weight_decay
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        g = g + self.wd * p
        d = self.mu * self.state.get("exp_avg", torch.zeros_like(p)) + (1 - self.mu) * g
        self.state["exp_avg"] = d
        p -= self.lr * d / (1 - self.mu**self.t)
