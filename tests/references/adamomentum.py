"""AdaMomentum, arXiv 2106.11514: Adam with v the EMA of m_t^2; eps either accumulated into v
(the public port, default) or added to the root (Adam-style)."""

import torch


class AdaMomentumRef:
    def __init__(self, lr, betas, eps, weight_decay=0.0, eps_mode="accumulate"):
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.wd, self.eps_mode = weight_decay, eps_mode
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        m = self.state.get("exp_avg", torch.zeros_like(p))
        v = self.state.get("exp_avg_sq", torch.zeros_like(p))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * m * m
        if self.eps_mode == "accumulate":
            v = v + self.eps
        self.state.update(exp_avg=m, exp_avg_sq=v)
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        if self.eps_mode == "accumulate":
            u = m_hat / v_hat.sqrt()
        else:
            u = m_hat / (v_hat.sqrt() + self.eps)
        p.mul_(1 - self.lr * self.wd)
        p -= self.lr * u
