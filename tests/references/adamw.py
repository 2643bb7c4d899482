import math

import torch


class AdamWRef:
    """AdamW, arXiv 1711.05101, Algorithm 2 (with lr as the schedule multiplier)."""

    def __init__(self, lr, betas, eps, weight_decay, nesterov=False, denominator="eps", softplus_beta=50.0):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.nesterov, self.denominator, self.softplus_beta = nesterov, denominator, softplus_beta
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        m = self.state.get("exp_avg", torch.zeros_like(p))
        v = self.state.get("exp_avg_sq", torch.zeros_like(p))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        self.state["exp_avg"], self.state["exp_avg_sq"] = m, v
        if self.nesterov:  # optax nadam: b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)
            m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        else:
            m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        if self.denominator == "atan2":  # Adam-atan2, arXiv 2407.05872, a = 1.27, b = 1
            u = 1.27 * torch.atan2(m_hat, v_hat.sqrt())
        elif self.denominator == "softplus":
            beta = self.softplus_beta  # Sadam, arXiv 1908.00700: log(1 + e^{beta x}) / beta, beta = 50
            u = m_hat / (torch.log1p(torch.exp(beta * v_hat.sqrt())) / beta)
        else:
            u = m_hat / (v_hat.sqrt() + self.eps)
        p -= self.lr * (u + self.wd * p)
        assert math.isfinite(float(p.sum()))
