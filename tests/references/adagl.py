"""AdaGL (Neural Processing Letters 2024, doi 10.1007/s11063-024-11571-7), written from the
formulas: D_t = sum_{j=0..K} (-1)^j Gamma(a+1) / (Gamma(j+1) Gamma(a-j+1)) g_{t-j} (the Gamma
form, not the library's recursion), Adam on D_t, step factor C_t = 1.1 - 1 / (2 (1 + |g_t -
g_{t-1}|)) elementwise or with the tensor mean of |g_t - g_{t-1}|; g_0 = 0."""

import math

import torch


def gl_weight(alpha: float, j: int) -> float:
    # Gamma(alpha - j + 1) has poles only at non-positive integers, which alpha in (0, 1) avoids
    return (-1) ** j * math.gamma(alpha + 1) / (math.gamma(j + 1) * math.gamma(alpha - j + 1))


class AdaGLRef:
    def __init__(self, lr, betas, eps, alpha, history, step_control="elementwise", weight_decay=0.0):
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.alpha, self.k, self.control, self.wd = alpha, history, step_control, weight_decay
        self.grads = []  # newest first: g_{t-1}, g_{t-2}, ...
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        d = sum(gl_weight(self.alpha, j) * gj for j, gj in enumerate([g] + self.grads[: self.k]))
        prev = self.grads[0] if self.grads else torch.zeros_like(g)
        change = (g - prev).abs()
        if self.control == "mean":
            change = change.mean()
        c = 1.1 - 1.0 / (2.0 * (1.0 + change))
        m = self.state.get("exp_avg", torch.zeros_like(p))
        v = self.state.get("exp_avg_sq", torch.zeros_like(p))
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        self.grads = [g.clone()] + self.grads[: self.k - 1]
        self.state.update(exp_avg=m, exp_avg_sq=v)
        for j in range(1, self.k + 1):
            self.state[f"grad_{j}"] = self.grads[j - 1] if j <= len(self.grads) else torch.zeros_like(p)
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p.mul_(1 - self.lr * self.wd)
        p -= self.lr * c * m_hat / (v_hat.sqrt() + self.eps)
