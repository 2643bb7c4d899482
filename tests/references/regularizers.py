"""AdamW with the issue-16 regularizers, float64, written from their papers / authors' code,
sharing no code with the library:

* gradient normalization: ``g <- g / (||g||_2 + eps)`` per tensor, before Adam;
* Norm Loss (arXiv 2103.06583, decoupled as in Ranger21): ``p <- p (1 - lr 2 f (1 - 1/(||w_i|| + eps)))``
  with ``w_i`` the output rows (dims 1..) of a 2+-D tensor, the whole of a 0-/1-D one, norms of
  the parameter before the step; then the AdamW step;
* CPR (arXiv 2311.09058, automl/CPR pytorch_cpr/adamcpr.py @82843ea, single-tensor path): after the
  Adam step (AdamCPR has no weight decay), ``lam = max(0, lam + mu/n (sum(p^2) - kappa))``,
  ``p <- p - 2 lam p``, with the bound set per ``kappa_init``; ``ip_reading="authors"`` is the
  single-tensor code's detector (evaluated every step, its EMA never stored: ``(1-d) R``),
  ``"sampled"`` the documented one (every ``step_size`` steps, a stored EMA);
* AdamS (arXiv 2011.11152, zeke-xie/stable-weight-decay-regularization swd_optim/adams.py @e0abb1d):
  :func:`adams_step` over ALL tensors at once.
"""

import math

import torch


def _row_norms(p, eps):
    if p.dim() < 2:
        return math.sqrt(float((p * p).sum())) + eps
    rows = p.reshape(p.shape[0], -1)
    norms = torch.tensor([math.sqrt(float((r * r).sum())) for r in rows], dtype=p.dtype) + eps
    return norms.reshape(-1, *([1] * (p.dim() - 1)))


class RegularizedAdamWRef:
    def __init__(
        self,
        lr,
        betas,
        eps,
        weight_decay,
        normalize_grad=False,
        normalize_grad_eps=1e-8,
        norm_loss=None,
        norm_loss_eps=1e-8,
        cpr=None,
    ):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.normalize_grad, self.normalize_grad_eps = normalize_grad, normalize_grad_eps
        self.norm_loss, self.norm_loss_eps = norm_loss, norm_loss_eps
        self.cpr = cpr  # dict(kappa_init, kappa, warm_start, mu, step_size, ema_decay, by_lr, ip_reading)
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        t, b1, b2, lr = self.t, self.b1, self.b2, self.lr
        if self.normalize_grad:
            g = g / (math.sqrt(float((g * g).sum())) + self.normalize_grad_eps)
        if self.cpr is not None and t == 1:
            self._cpr_init(p)
        m = b1 * self.state.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
        v = b2 * self.state.get("exp_avg_sq", torch.zeros_like(p)) + (1 - b2) * g * g
        self.state.update(exp_avg=m, exp_avg_sq=v)
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
        pull = 0.0
        if self.norm_loss is not None:  # decoupled, from the parameter before the step (as the decay)
            pull = 2 * self.norm_loss * (1 - 1 / _row_norms(p, self.norm_loss_eps))
        if self.cpr is None:
            p -= lr * (u + self.wd * p + pull * p)
        else:
            p -= lr * u
            self._cpr_step(p, t)
        assert math.isfinite(float(p.sum()))

    # ---------------------------------------------------------------- CPR
    def _cpr_init(self, p):
        c = self.cpr
        self.state["cpr_lambda"] = torch.tensor(0.0, dtype=torch.float64)
        kappa = -1.0
        if c["kappa_init"] == "constant":
            kappa = c["kappa"]
        elif c["kappa_init"] == "dependent":
            kappa = c["kappa"] * float((p * p).sum())
        self.state["cpr_kappa"] = torch.tensor(kappa, dtype=torch.float64)
        if c["kappa_init"] == "inflection_point":
            for key in ("cpr_prev", "cpr_delta"):
                self.state[key] = torch.tensor(0.0, dtype=torch.float64)
            if c.get("ip_reading") == "sampled":  # the authors' code never stores it (stays 0)
                self.state["cpr_ema"] = torch.tensor(0.0, dtype=torch.float64)

    def _cpr_step(self, p, t):
        c, st = self.cpr, self.state
        r = float((p * p).sum())
        kappa = float(st["cpr_kappa"])
        if kappa >= 0:  # the bound is set: the constraint (authors' l2_update)
            lam = max(0.0, float(st["cpr_lambda"]) + c["mu"] / p.numel() * (r - kappa))
            st["cpr_lambda"] = torch.tensor(lam, dtype=torch.float64)
            p -= 2 * lam * (self.lr if c["by_lr"] else 1.0) * p
        elif c["kappa_init"] == "warm_start":
            if t == c["warm_start"]:
                st["cpr_kappa"] = torch.tensor(r, dtype=torch.float64)
        elif c["kappa_init"] == "inflection_point":
            size, d = c["step_size"], c["ema_decay"]
            if c.get("ip_reading") == "sampled" and t % size != 0:
                return
            ema = d * float(st.get("cpr_ema", 0.0)) + (1 - d) * r
            if c.get("ip_reading") == "sampled":
                st["cpr_ema"] = torch.tensor(ema, dtype=torch.float64)
            if t > size:
                growth = ema - float(st["cpr_prev"])
                if t > 3 * size and float(st["cpr_delta"]) > growth:
                    st["cpr_kappa"] = torch.tensor(r, dtype=torch.float64)
                st["cpr_prev"] = torch.tensor(ema, dtype=torch.float64)
                if t > 2 * size:
                    st["cpr_delta"] = torch.tensor(growth, dtype=torch.float64)


def adams_step(params, grads, states, groups, t):
    """One AdamS step over every tensor (``groups[i]``: lr, betas, eps, weight_decay of tensor i)."""
    total, size = 0.0, 0
    for p, g, st, grp in zip(params, grads, states, groups):
        b1, b2 = grp["betas"]
        st["exp_avg"] = b1 * st.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
        st["exp_avg_sq"] = b2 * st.get("exp_avg_sq", torch.zeros_like(p)) + (1 - b2) * g * g
        total += float((st["exp_avg_sq"] / (1 - b2**t)).sum())
        size += p.numel()
    root = math.sqrt(total / size)
    for p, st, grp in zip(params, states, groups):
        b1, b2 = grp["betas"]
        if grp["weight_decay"] != 0:
            p.mul_(1 - grp["weight_decay"] * grp["lr"] / root)
        denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt() + grp["eps"]
        p -= grp["lr"] / (1 - b1**t) * st["exp_avg"] / denom
