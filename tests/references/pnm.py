"""Positive-Negative Momentum, arXiv 2103.17182: Algorithm 1 (SGD form) and Algorithm 2 (AdaPNM),
with decoupled weight decay (the official code's default). Momenta are kept under the official
code's key names: the odd-step momentum in the first, the even-step one in the second."""

import math

import torch


class PNMRef:
    def __init__(self, lr, betas, weight_decay=0.0):
        self.lr, (self.b1, self.b0), self.wd = lr, betas, weight_decay
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        zeros = torch.zeros_like(p)
        odd, even = self.state.get("pos_momentum", zeros), self.state.get("neg_momentum", zeros)
        m_prev = odd if self.t % 2 == 0 else even  # m_{t-1}: the other parity
        m_old = even if self.t % 2 == 0 else odd  # m_{t-2}
        m = self.b1**2 * m_old + (1 - self.b1**2) * g
        if self.t % 2 == 1:
            self.state.update(pos_momentum=m, neg_momentum=even)
        else:
            self.state.update(pos_momentum=odd, neg_momentum=m)
        b0 = self.b0
        direction = ((1 + b0) * m - b0 * m_prev) / math.sqrt((1 + b0) ** 2 + b0**2)
        p.mul_(1 - self.lr * self.wd)
        p -= self.lr * direction


class AdaPNMRef:
    def __init__(self, lr, betas, eps, weight_decay=0.0, amsgrad=True):
        self.lr, (self.b1, self.b2, self.b0), self.eps = lr, betas, eps
        self.wd, self.amsgrad = weight_decay, amsgrad
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2, b0 = self.t, self.b1, self.b2, self.b0
        zeros = torch.zeros_like(p)
        odd, even = self.state.get("exp_avg", zeros), self.state.get("neg_exp_avg", zeros)
        m_prev = odd if t % 2 == 0 else even
        m_old = even if t % 2 == 0 else odd
        m = b1**2 * m_old + (1 - b1**2) * g
        if t % 2 == 1:
            self.state.update(exp_avg=m, neg_exp_avg=even)
        else:
            self.state.update(exp_avg=odd, neg_exp_avg=m)
        v = b2 * self.state.get("exp_avg_sq", zeros) + (1 - b2) * g * g
        self.state["exp_avg_sq"] = v
        second = v
        if self.amsgrad:
            second = self.state["max_exp_avg_sq"] = torch.maximum(self.state.get("max_exp_avg_sq", zeros), v)
        pn = ((1 + b0) * m - b0 * m_prev) / math.sqrt((1 + b0) ** 2 + b0**2)
        u = pn / (1 - b1**t) / ((second / (1 - b2**t)).sqrt() + self.eps)
        p.mul_(1 - self.lr * self.wd)
        p -= self.lr * u
