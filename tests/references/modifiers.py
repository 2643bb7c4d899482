"""AdamW with the modifiers applied by their papers' formulas, float64, one tensor at a time.

Written from the papers, sharing no code with the library. Gradient modifiers are applied in the
library's order (AGC, soft clip, centralization), then coupled (L2) decay, Adam, the cautious
mask, the trust ratio, and the weight-decay form:

* AGC (NFNets, arXiv 2102.06171, ``clip_grad``): per unit (row of a >=2-D tensor, the whole
  of a 1-D one), ``g <- g * c max(||p||, eps) / max(||g||, 1e-6)`` where
  ``||g|| > c max(||p||, eps)``.
* soft clip (seed author's): per unit, ``g <- g * min(rms(g), rms(p)) / rms(g)``, RMS floored at
  1e-12.
* gradient centralization (arXiv 2004.01461): ``g <- g - mean over dims 1..`` for >=2-D tensors.
* Adam-atan2 (arXiv 2407.05872): ``u = 1.27 atan2(m_hat, sqrt(v_hat))``; softplus (Sadam,
  arXiv 1908.00700): ``u = m_hat / softplus_beta(sqrt(v_hat))``, ``softplus_b(x) = log(1+e^{bx})/b``.
* cautious mask (arXiv 2411.16085, later code): ``u <- u 1[u g > 0] / max(mean(1[u g > 0]), 1e-3)``.
* LAMB trust ratio (arXiv 1904.00962, Algorithm 2): with decoupled decay the decay joins the
  direction, ``r = u + wd p``, and ``p <- p - lr phi(||p||)/||r|| r``, ``phi(z) = min(z, clamp)``,
  ratio 1 where a norm is 0; with other decay forms the ratio scales ``u`` alone.
* weight decay: decoupled (arXiv 1711.05101) ``p <- p - lr (u + wd p)``; cautious
  (arXiv 2510.12402) ``p <- p - lr (u + wd 1[u p >= 0] p)``; proximal (Adan)
  ``p <- (p - lr u)/(1 + lr wd)``; l2 ``g <- g + wd p`` before Adam.
"""

import math

import torch


def _units(x):
    """Rows of a >=2-D tensor as a matrix; a 1-D tensor as one row."""
    return x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)


def agc(g, p, clip, eps):
    gu, pu = _units(g), _units(p)
    out = []
    for gr, pr in zip(gu, pu):
        g_norm = math.sqrt(float((gr * gr).sum()))
        max_norm = clip * max(math.sqrt(float((pr * pr).sum())), eps)
        out.append(gr * (max_norm / max(g_norm, 1e-6)) if g_norm > max_norm else gr)
    return torch.stack(out).reshape(g.shape)


def soft_clip(g, p, eps=1e-12):
    gu, pu = _units(g), _units(p)
    n = gu.shape[1]
    out = []
    for gr, pr in zip(gu, pu):
        rms_g = max(math.sqrt(float((gr * gr).sum()) / n), 1e-12)
        rms_p = max(math.sqrt(float((pr * pr).sum()) / n), eps)
        out.append(gr * (min(rms_g, rms_p) / rms_g))
    return torch.stack(out).reshape(g.shape)


def centralize(g):
    if g.dim() < 2:
        return g
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


class ModifiedAdamWRef:
    def __init__(
        self,
        lr,
        betas,
        eps,
        weight_decay,
        weight_decay_mode="decoupled",
        agc=None,
        agc_eps=1e-3,
        soft_clip=False,
        soft_clip_eps=1e-12,
        centralize=False,
        cautious=False,
        trust_ratio=False,
        trust_clamp=10.0,
        denominator="eps",
        softplus_beta=50.0,
    ):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.mode, self.agc, self.agc_eps = weight_decay_mode, agc, agc_eps
        self.soft_clip, self.centralize, self.cautious = soft_clip, centralize, cautious
        self.soft_clip_eps = soft_clip_eps
        self.trust_ratio, self.trust_clamp = trust_ratio, trust_clamp
        self.denominator, self.softplus_beta = denominator, softplus_beta
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2, lr, wd = self.t, self.b1, self.b2, self.lr, self.wd
        if self.agc is not None:
            g = agc(g, p, self.agc, self.agc_eps)
        if self.soft_clip:
            g = soft_clip(g, p, self.soft_clip_eps)
        if self.centralize:
            g = centralize(g)
        if self.mode == "l2":
            g = g + wd * p
        m = b1 * self.state.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
        v = b2 * self.state.get("exp_avg_sq", torch.zeros_like(p)) + (1 - b2) * g * g
        self.state.update(exp_avg=m, exp_avg_sq=v)
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        if self.denominator == "atan2":
            u = 1.27 * torch.atan2(m_hat, v_hat.sqrt())
        elif self.denominator == "softplus":
            beta = self.softplus_beta
            u = m_hat / (torch.log1p(torch.exp(beta * v_hat.sqrt())) / beta)
        else:
            u = m_hat / (v_hat.sqrt() + self.eps)
        if self.cautious:
            mask = (u * g > 0).to(u.dtype)
            u = u * mask / max(float(mask.mean()), 1e-3)
        decay_done = False
        if self.trust_ratio:
            r = u + wd * p if self.mode == "decoupled" else u
            p_norm = min(math.sqrt(float((p * p).sum())), self.trust_clamp or math.inf)
            r_norm = math.sqrt(float((r * r).sum()))
            ratio = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
            u = ratio * r
            decay_done = self.mode == "decoupled"
        if self.mode == "decoupled" and not decay_done:
            p -= lr * (u + wd * p)
        elif self.mode == "cautious":
            p -= lr * (u + wd * (u * p >= 0).to(p.dtype) * p)
        elif self.mode == "proximal":
            p.copy_((p - lr * u) / (1 + lr * wd))
        else:  # l2 (decay already in g) or decoupled with the decay inside the trust ratio
            p -= lr * u
