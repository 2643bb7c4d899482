"""AdamW^2's step control (arXiv 2505.21910) on AdamW, float64, one tensor at a time:
lr_t = min(lr, tau sigma1(W_{t-1}) / sigma1(u_t)) for tensors of 2+ dims (as rows x rest),
sigma1 by power iteration on A^T A from the library's documented start vector (v_i =
frac(i * 0.618...), i = 1..n, unit length), sigma1 ~ ||A v_K||; no cap where sigma1(W) = 0."""

import torch

from tests.references.adamw import AdamWRef


def start_vector(n: int) -> torch.Tensor:
    v = torch.tensor([(i * (5**0.5 - 1) / 2) % 1.0 for i in range(1, n + 1)], dtype=torch.float64)
    return v / v.norm()


def power_sigma1(a: torch.Tensor, iters: int) -> float:
    a = a.reshape(a.shape[0], -1).double()
    v = start_vector(a.shape[1])
    for _ in range(iters):
        w = a.T @ (a @ v)
        n = w.norm()
        v = w / n if n > 0 else w
    return float((a @ v).norm())


class SpectralCapAdamWRef(AdamWRef):
    def __init__(self, lr, betas, eps, weight_decay, tau, iters):
        super().__init__(lr, betas, eps, weight_decay)
        self.tau, self.iters = tau, iters
        self.capped = []  # per step of a 2+-D tensor: whether the cap fired

    def step(self, p, g):
        # AdamW's direction, then the capped learning rate, then decoupled decay with the plain lr
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        m = self.state.get("exp_avg", torch.zeros_like(p))
        v = self.state.get("exp_avg_sq", torch.zeros_like(p))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        self.state["exp_avg"], self.state["exp_avg_sq"] = m, v
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
        lr_t = self.lr
        if p.dim() >= 2:
            s_w, s_u = power_sigma1(p, self.iters), power_sigma1(u, self.iters)
            if s_w > 0 and s_u > 0:
                lr_t = min(self.lr, self.tau * s_w / s_u)
            self.capped.append(lr_t < self.lr)
        p -= lr_t * u + self.lr * self.wd * p
