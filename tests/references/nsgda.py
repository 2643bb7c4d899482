import torch


class NSGDARef:
    """Normalized SGD with momentum (Jelassi et al. 2022, "Dissecting adaptive methods in GANs",
    arXiv 2210.04319), normalized per tensor, eps in the denominator, coupled decay by default:
    m = mu m + (1 - mu)(g + wd p);  p -= lr m / (||m / bc|| bc + eps), norm over the whole tensor."""

    def __init__(self, lr, momentum, eps, weight_decay, weight_decay_mode="l2"):
        self.lr, self.mu, self.eps, self.wd, self.mode = lr, momentum, eps, weight_decay, weight_decay_mode
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        mu, lr, wd = self.mu, self.lr, self.wd
        if self.mode == "l2":
            g = g + wd * p
        m = self.state.get("exp_avg", torch.zeros_like(p))
        m = mu * m + (1 - mu) * g
        self.state["exp_avg"] = m
        bc = 1 - mu**self.t
        m_hat = m / bc
        u = m / (torch.sqrt((m_hat * m_hat).sum()) * bc + self.eps)
        if self.mode == "decoupled":
            p.copy_(p * (1 - lr * wd) - lr * u)
        elif self.mode == "cautious":  # arXiv 2510.12402: decay only where u and p agree in sign
            p.copy_(p - lr * (u + wd * torch.where(u * p >= 0, p, torch.zeros_like(p))))
        else:
            p.copy_(p - lr * u)
