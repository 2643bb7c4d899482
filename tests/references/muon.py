"""Muon, paper-literal in float64 (Jordan 2024; Liu et al. 2025, arXiv 2502.16982), with AdamW
(Moonlight's betas) for parameters of fewer than two dimensions."""

import math

import torch


def newton_schulz_literal(G, steps, coefficients, eps):
    """X_0 = G / max(||G||_F, eps), on the wide orientation; X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    a, b, c = coefficients
    tall = G.shape[0] > G.shape[1]
    X = G.T if tall else G
    X = X / max(float(torch.linalg.matrix_norm(X)), eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    return X.T if tall else X


class MuonRef:
    def __init__(
        self,
        lr,
        weight_decay,
        momentum=0.95,
        nesterov=True,
        momentum_form="ema",
        ns_steps=5,
        ns_coefficients=(3.4445, -4.7750, 2.0315),
        ns_eps=1e-7,
        update_scale="match_rms_adamw",
        betas=(0.9, 0.95),
        eps=1e-8,
    ):
        self.lr, self.wd, self.mu, self.nesterov, self.form = lr, weight_decay, momentum, nesterov, momentum_form
        self.steps, self.coefficients, self.ns_eps, self.scale = ns_steps, ns_coefficients, ns_eps, update_scale
        self.b1, self.b2 = betas
        self.eps = eps
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        if p.dim() < 2:
            return self._adamw(p, g)
        mu = self.mu
        B = self.state.get("momentum_buffer", torch.zeros_like(p))
        if self.form == "ema":  # torch / Jordan: B = mu B + (1 - mu) g, nesterov (1 - mu) g + mu B
            B = mu * B + (1 - mu) * g
            u = (1 - mu) * g + mu * B if self.nesterov else B
        else:  # Moonlight: B = mu B + g, nesterov g + mu B
            B = mu * B + g
            u = g + mu * B if self.nesterov else B
        self.state["momentum_buffer"] = B
        rows, cols = p.shape[0], math.prod(p.shape[1:])
        O = newton_schulz_literal(u.reshape(rows, cols), self.steps, self.coefficients, self.ns_eps).reshape(p.shape)
        s = 0.2 * math.sqrt(max(rows, cols)) if self.scale == "match_rms_adamw" else math.sqrt(max(1, rows / cols))
        p -= self.lr * self.wd * p + self.lr * s * O
        assert math.isfinite(float(p.sum()))

    def _adamw(self, p, g):
        t, b1, b2 = self.t, self.b1, self.b2
        m = b1 * self.state.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
        v = b2 * self.state.get("exp_avg_sq", torch.zeros_like(p)) + (1 - b2) * g * g
        self.state["exp_avg"], self.state["exp_avg_sq"] = m, v
        p -= self.lr * ((m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps) + self.wd * p)
