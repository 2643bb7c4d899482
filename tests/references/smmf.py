"""SMMF, paper-literal (Park & Lee 2024, arXiv 2412.08894, Algorithm 1 with its NNMF / UnNNMF
and square-matricization; schedules and defaults as the authors' code), float64, one tensor at
a time. Keeps the factors and the sign matrix itself:

    (a, b) = (n/i, i), i the largest divisor of n with i <= sqrt(n)
    M_hat = S * (r_M c_M^T) with S = +1 where the sign bit is set, else -1;  V_hat = r_V c_V^T
    bm = b1 growth^(t-1);  bv = 1 - t^decay
    M = bm M_hat + (1-bm) G;  V = bv V_hat + (1-bv) G^2          (no bias correction)
    S = [M > 0];  (r_M, c_M) = NNMF(|M|);  (r_V, c_V) = NNMF(V)
    NNMF(A): r = A 1, c = 1^T A, the shorter side divided by its sum (unless 0)
    p = p - lr (M / (sqrt(V) + eps) + wd p)
The sign matrix is compared with hfoptim's packed bits through numpy.packbits (little bit order).
"""

import math

import numpy as np
import torch


def square_shape(n):
    i = int(math.isqrt(n))
    while n % i:
        i -= 1
    return n // i, i


def nnmf(a):
    r, c = a.sum(dim=1), a.sum(dim=0)
    if a.shape[0] < a.shape[1]:
        if r.sum() != 0:
            r = r / r.sum()
    elif c.sum() != 0:
        c = c / c.sum()
    return r, c


class SMMFRef:
    def __init__(self, lr=1e-3, beta1=0.9, eps=1e-8, weight_decay=0.0, decay_rate=-0.5, growth_rate=0.999):
        self.lr, self.b1, self.eps, self.wd = lr, beta1, eps, weight_decay
        self.decay, self.growth = decay_rate, growth_rate
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t = self.t
        a, b = square_shape(p.numel())
        G = g.reshape(a, b)
        st = self.state
        if not st:
            st["rV"], st["cV"] = torch.zeros(a, dtype=p.dtype), torch.zeros(b, dtype=p.dtype)
            if self.b1 is not None:
                st["rM"], st["cM"] = torch.zeros(a, dtype=p.dtype), torch.zeros(b, dtype=p.dtype)
                self.sign = torch.zeros(a, b, dtype=torch.bool)
        bv = 1 - t**self.decay
        V = bv * torch.outer(st["rV"], st["cV"]) + (1 - bv) * G * G
        st["rV"], st["cV"] = nnmf(V)
        if self.b1 is None:
            M = G
        else:
            M_hat = torch.where(self.sign, 1.0, -1.0).to(p.dtype) * torch.outer(st["rM"], st["cM"])
            bm = self.b1 * self.growth ** (t - 1)
            M = bm * M_hat + (1 - bm) * G
            self.sign = M > 0
            st["rM"], st["cM"] = nnmf(M.abs())
            bits = np.packbits(self.sign.reshape(-1).numpy(), bitorder="little")
            st["sign"] = torch.from_numpy(bits.astype(np.float64))
        U = M / (V.sqrt() + self.eps)
        p -= self.lr * (U.reshape(p.shape) + self.wd * p)


#: reference state names -> hfoptim's stored keys (smmf storage)
STATE_MAP = {
    "rM": "exp_avg.row",
    "cM": "exp_avg.col",
    "sign": "exp_avg.sign",
    "rV": "exp_avg_sq.row",
    "cV": "exp_avg_sq.col",
}
