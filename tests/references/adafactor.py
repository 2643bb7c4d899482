"""Adafactor, paper-literal (Shazeer & Stern 2018, arXiv 1804.04235, Algorithms 4/5 and
sections 5-8), float64, one tensor at a time. Keeps the factored statistics R and C itself:

    b2 = 1 - t^c;  R = b2 R + (1-b2) (G^2 + eps1) 1;  C = b2 C + (1-b2) 1^T (G^2 + eps1)
    V = R C / 1^T R  (2+-D, viewed as (shape[0], rest));  V = b2 V + (1-b2)(G^2 + eps1)  (1-D)
    U = G / sqrt(V);  U /= max(1, RMS(U)/d);  [m = b1 m + (1-b1) U;  U = m]
    rho = min(lr, 1/sqrt(t)) | lr;  alpha = max(eps2, RMS(X)) rho | rho
    X = X - alpha (U + wd X)

The choices the paper leaves open (relative-step cap = lr, momentum on U before alpha, decay
by alpha) are hfoptim's documented ones (hfoptim/rules/adafactor.py).
"""

import math

import torch


def rms(x):
    return math.sqrt(float((x * x).mean()))


class AdafactorRef:
    def __init__(
        self,
        lr=1e-2,
        beta1=None,
        decay_rate=-0.8,
        eps1=1e-30,
        eps2=1e-3,
        clip_threshold=1.0,
        relative_step=True,
        scale_parameter=True,
        weight_decay=0.0,
    ):
        self.lr, self.beta1, self.c = lr, beta1, decay_rate
        self.eps1, self.eps2, self.d = eps1, eps2, clip_threshold
        self.relative_step, self.scale_parameter, self.wd = relative_step, scale_parameter, weight_decay
        self.state = {}
        self.t = 0

    def step(self, X, G):
        self.t += 1
        t = self.t
        rho = min(self.lr, 1 / math.sqrt(t)) if self.relative_step else self.lr
        alpha = max(self.eps2, rms(X)) * rho if self.scale_parameter else rho
        b2 = 1 - t**self.c
        G2 = G * G + self.eps1
        if X.dim() >= 2:
            G2 = G2.reshape(X.shape[0], -1)
            R = self.state.get("R", torch.zeros(G2.shape[0], dtype=X.dtype))
            C = self.state.get("C", torch.zeros(G2.shape[1], dtype=X.dtype))
            R = b2 * R + (1 - b2) * G2.sum(dim=1)
            C = b2 * C + (1 - b2) * G2.sum(dim=0)
            self.state["R"], self.state["C"] = R, C
            V = (torch.outer(R, C) / R.sum()).reshape(X.shape)
        else:
            V = self.state.get("V", torch.zeros_like(X))
            V = b2 * V + (1 - b2) * G2
            self.state["V"] = V
        U = G / V.sqrt()
        U = U / max(1.0, rms(U) / self.d)
        if self.beta1 is not None:
            m = self.state.get("m", torch.zeros_like(X))
            m = self.beta1 * m + (1 - self.beta1) * U
            self.state["m"] = m
            U = m
        X -= alpha * (U + self.wd * X)


#: reference state names -> hfoptim's stored keys (factored storage)
STATE_MAP = {"R": "exp_avg_sq.row", "C": "exp_avg_sq.col", "V": "exp_avg_sq", "m": "exp_avg"}
