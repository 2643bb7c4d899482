"""AdamNorm, arXiv 2210.06364 (AdaNorm paper, Adam form), with coupled (L2) weight decay as the
official code's default."""

import math

import torch


class AdaNormRef:
    def __init__(self, lr, betas, eps, gamma=0.95, weight_decay=0.0, weight_decay_mode="l2"):
        self.lr, (self.b1, self.b2), self.eps, self.gamma = lr, betas, eps, gamma
        self.wd, self.mode = weight_decay, weight_decay_mode
        self.state = {"exp_grad_norm": 0.0}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        if self.mode == "l2":
            g = g + self.wd * p
        g_norm = math.sqrt(float((g * g).sum()))
        e = self.gamma * self.state["exp_grad_norm"] + (1 - self.gamma) * g_norm
        s = g * (e / g_norm) if e > g_norm > 0 else g
        m = self.state.get("exp_avg", torch.zeros_like(p))
        v = self.state.get("exp_avg_sq", torch.zeros_like(p))
        m = b1 * m + (1 - b1) * s
        v = b2 * v + (1 - b2) * g * g
        self.state.update(exp_avg=m, exp_avg_sq=v, exp_grad_norm=e)
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
        if self.mode == "decoupled":
            p.mul_(1 - self.lr * self.wd)
        p -= self.lr * u
