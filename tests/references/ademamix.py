import math

import torch


class AdEMAMixRef:
    """AdEMAMix, arXiv 2409.03137, Algorithm 1, with the alpha and beta3 warm-up schedulers of
    Sec. 3 (separate lengths T_alpha, T_beta3; None = no warm-up)."""

    def __init__(self, lr, betas, alpha, eps, weight_decay, t_alpha=None, t_beta3=None, denominator="eps"):
        self.lr, (self.b1, self.b2, self.b3), self.alpha = lr, betas, alpha
        self.eps, self.wd, self.t_alpha, self.t_beta3 = eps, weight_decay, t_alpha, t_beta3
        self.denominator = denominator
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        alpha = self.alpha if self.t_alpha is None else min(t * self.alpha / self.t_alpha, self.alpha)
        if self.t_beta3 is None:
            b3 = self.b3
        else:
            s = t / self.t_beta3
            lb1, lb3 = math.log(b1), math.log(self.b3)
            b3 = min(math.exp(lb1 * lb3 / ((1 - s) * lb3 + s * lb1)), self.b3)
        m1 = self.state.get("exp_avg", torch.zeros_like(p))
        m2 = self.state.get("exp_avg_slow", torch.zeros_like(p))
        v = self.state.get("exp_avg_sq", torch.zeros_like(p))
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3 * m2 + (1 - b3) * g
        v = b2 * v + (1 - b2) * g * g
        self.state.update(exp_avg=m1, exp_avg_slow=m2, exp_avg_sq=v)
        num = m1 / (1 - b1**t) + alpha * m2  # the slow EMA is not bias-corrected
        root = (v / (1 - b2**t)).sqrt()
        if self.denominator == "atan2":  # Adam-atan2, arXiv 2407.05872, a = 1.27, b = 1
            u = 1.27 * torch.atan2(num, root)
        else:
            u = num / (root + self.eps)
        p -= self.lr * (u + self.wd * p)
