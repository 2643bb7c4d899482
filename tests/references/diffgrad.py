"""diffGrad, arXiv 1909.11015, Algorithm 1, with the official code's g_0 = 0 and L2 weight decay."""

import torch


class DiffGradRef:
    def __init__(self, lr, betas, eps, weight_decay=0.0, weight_decay_mode="l2"):
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.wd, self.mode = weight_decay, weight_decay_mode
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        if self.mode == "l2":
            g = g + self.wd * p
        m = self.state.get("exp_avg", torch.zeros_like(p))
        v = self.state.get("exp_avg_sq", torch.zeros_like(p))
        g_prev = self.state.get("prev_grad", torch.zeros_like(p))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        xi = 1.0 / (1.0 + torch.exp(-(g_prev - g).abs()))  # AbsSig
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        self.state.update(exp_avg=m, exp_avg_sq=v, prev_grad=g.clone())
        u = xi * m_hat / (v_hat.sqrt() + self.eps)
        if self.mode == "decoupled":
            p.mul_(1 - self.lr * self.wd)
        p -= self.lr * u
