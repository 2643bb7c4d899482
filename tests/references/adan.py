import torch


class AdanRef:
    """Adan, arXiv 2208.06677, Algorithm 1 (betas in the official code's form, i.e. 1 - paper
    betas; bias corrections as the official code), with proximal or decoupled weight decay."""

    def __init__(self, lr, betas, eps, weight_decay, weight_decay_mode="proximal", denominator="eps"):
        self.lr, (self.b1, self.b2, self.b3), self.eps, self.wd = lr, betas, eps, weight_decay
        self.mode, self.denominator = weight_decay_mode, denominator
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2, b3, lr, wd = self.t, self.b1, self.b2, self.b3, self.lr, self.wd
        if self.mode == "l2":
            g = g + wd * p
        g_prev = self.state.get("prev_grad")
        d = torch.zeros_like(g) if t == 1 else g - g_prev
        m = self.state.get("exp_avg", torch.zeros_like(p))
        n = self.state.get("exp_avg_diff", torch.zeros_like(p))
        v = self.state.get("exp_avg_sq", torch.zeros_like(p))
        m = b1 * m + (1 - b1) * g
        n = b2 * n + (1 - b2) * d
        v = b3 * v + (1 - b3) * (g + b2 * d) ** 2
        self.state.update(exp_avg=m, exp_avg_diff=n, exp_avg_sq=v, prev_grad=g.clone())
        num = m / (1 - b1**t) + b2 * n / (1 - b2**t)
        root = (v / (1 - b3**t)).sqrt()
        if self.denominator == "atan2":  # Adam-atan2, arXiv 2407.05872, a = 1.27, b = 1
            u = 1.27 * torch.atan2(num, root)
        else:
            u = num / (root + self.eps)
        if self.mode == "proximal":
            p.copy_((p - lr * u) / (1 + lr * wd))
        elif self.mode == "decoupled":
            p.copy_(p * (1 - lr * wd) - lr * u)
        elif self.mode == "cautious":  # arXiv 2510.12402: decay only where u and p agree in sign
            p.copy_(p - lr * (u + wd * torch.where(u * p >= 0, p, torch.zeros_like(p))))
        else:  # l2: already in g
            p.copy_(p - lr * u)
