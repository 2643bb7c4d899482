import math

import torch


class AmosRef:
    """Amos, arXiv 2210.11693, as google-research/jestimator ``scale_by_amos`` with a scalar
    (whole-tensor) second moment, ``finetune_rate = 1``, ``b_0 = 0``, and ``optax.ema(momentum,
    debias=False)`` of the update when momentum > 0; plus decoupled weight decay ``wd``."""

    def __init__(self, lr, beta, zeta, eps, eta=None, eta_gain=2.0, momentum=0.0, weight_decay=0.0):
        self.xi, self.beta, self.zeta, self.eps = lr, beta, zeta, eps
        self.eta, self.eta_gain, self.momentum, self.wd = eta, eta_gain, momentum, weight_decay
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        xi, beta, zeta = self.xi, self.beta, self.zeta
        if self.eta is not None:
            eta = self.eta
        elif p.dim() <= 1:
            eta = 0.5
        else:  # sqrt(gain / fan_in), torch layout (out, in, *kernel)
            eta = math.sqrt(self.eta_gain / (p.numel() / p.shape[0]))
        v = self.state.get("exp_avg_sq", torch.zeros((), dtype=p.dtype))
        b = self.state.get("decay", torch.zeros((), dtype=p.dtype))
        g2 = (g * g).mean()
        v = v * beta + g2 * (1 - beta)
        rcpl_v_hat = (1 - beta**self.t) / torch.clamp(v, min=self.eps)
        gamma = torch.rsqrt(1 + zeta * math.sqrt(xi) * b) * (xi**2 * rcpl_v_hat * g2)
        init_lr = xi * eta
        delta = (1 / (1 + zeta * math.sqrt(init_lr) * b)) * (-init_lr * torch.sqrt(rcpl_v_hat) * g - 0.5 * gamma * p)
        b = b + gamma * (1 + b)
        self.state.update(exp_avg_sq=v, decay=b)
        if self.momentum > 0:  # optax.ema(debias=False) of the update; the library keeps it per unit lr
            ema = self.state.get("exp_avg", torch.zeros_like(p)) * -xi
            ema = self.momentum * ema + (1 - self.momentum) * delta
            self.state["exp_avg"] = ema / -xi
            delta = ema
        p.copy_(p * (1 - xi * self.wd) + delta)
