"""Muon: the momentum of each hidden weight matrix orthogonalized by a Newton-Schulz iteration;
AdamW, in the same optimizer, for every other parameter."""

from __future__ import annotations

import math
from functools import partial

import torch

from ..core.hparams import HP, HyperparameterError, betas
from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Rule, Slot

#: torch.optim.Muon's (and Keller Jordan's) quintic coefficients (a, b, c)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

#: which update a parameter group runs: "auto" splits a group by dimension when it is added
ALGORITHMS = ("auto", "muon", "adamw")

NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def newton_schulz(x: torch.Tensor, steps: int, coefficients: tuple, eps: float) -> torch.Tensor:
    r"""The Newton-Schulz orthogonalization of the matrix ``x``, in ``x``'s dtype (torch.optim.Muon's
    ``_zeropower_via_newtonschulz`` step for step):

    .. math::
        X_0 = G / \max(\|G\|_F, \epsilon) \ \text{(transposed when rows > cols)},\qquad
        A = X X^T,\ \ X \leftarrow a X + (b A + c A^2) X \ \ (\text{steps times})

    The result is about ``U S' V^T`` for ``G = U S V^T``, ``S'`` in roughly [0.5, 1.5] with the
    default coefficients (Jordan 2024)."""
    a, b, c = coefficients
    tall = x.shape[0] > x.shape[1]
    X = x.T if tall else x
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        gram = X @ X.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        X = torch.addmm(X, poly, X, beta=a)
    return X.T if tall else X


def update_scale(shape: torch.Size, form: str) -> float:
    """The factor on the orthogonalized update of a ``(A, B)`` matrix (``B`` = elements per row;
    the matrix as its parameter layout presents it, ``(out, in)``):
    ``match_rms_adamw``: ``0.2 sqrt(max(A, B))`` (Liu et al., arXiv 2502.16982: update RMS about
    0.2, AdamW's, so AdamW's lr and weight decay carry over); ``original``: ``sqrt(max(1, A/B))``
    (Keller Jordan's, torch.optim.Muon's default)."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    if form == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def _is_muon(group: dict) -> bool:
    return group["algorithm"] != "adamw"


def _is_adamw(group: dict) -> bool:
    return group["algorithm"] != "muon"


class MuonRule(Rule):
    r"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
    Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982), with AdamW for the
    parameters that are not hidden matrices.

    Matrices (``algorithm="muon"``; a ``(out, in, k, k)`` kernel is the ``(out, in*k*k)`` matrix):

    .. math::
        B_t = \mu B_{t-1} + (1-\mu) g_t,\qquad
        \tilde B_t = (1-\mu) g_t + \mu B_t \ \ (\text{nesterov; else } B_t)

        O_t = \mathrm{NS}^{(a,b,c)}_k(\tilde B_t),\qquad
        p_t = (1 - \mathrm{lr}\,\mathrm{wd})\, p_{t-1} - \mathrm{lr}\, s(A, B)\, O_t

    with ``s = 0.2 sqrt(max(A, B))`` (``update_scale="match_rms_adamw"``, the default: AdamW's lr
    and weight decay carry over) or ``sqrt(max(1, A/B))`` (``"original"``, torch's default).
    ``momentum_form="sum"`` is Moonlight's ``B_t = mu B_{t-1} + g_t``, ``g_t + mu B_t`` (the same
    direction after the normalisation, eps aside). NS runs in ``ns_dtype`` (bf16 as torch and
    Keller Jordan; ``fp32``; ``param``: the parameter's compute dtype, for float64 references).
    Under FSDP2 / ZeRO each matrix is gathered on one process, orthogonalized there once and its
    rows sent back (:meth:`hfoptim.core.stats.LocalStats.matrix_map`), never from a shard.
    With a gradient modifier that reads a whole-tensor statistic before Newton-Schulz (``gradnorm``,
    ``agc``, ``gc``, ``softclip``), the sharded statistic is the one-process value up to its last
    fp32 bit (the processes sum in another order); the bf16 cast before Newton-Schulz can round
    such a value to the neighbouring bf16 number (a relative 2^-8) and the iteration carries
    that on, so the sharding equivalence tests run those combinations with ``ns_dtype="fp32"``
    (tests/distributed/common.py) and the default bf16 iteration elsewhere. A sharded bf16 run is
    the same algorithm; it differs from one process's by such roundings, not by a shard-local
    computation.

    Other parameters (``algorithm="adamw"``): AdamW with ``betas`` (Moonlight's (0.9, 0.95)),
    ``eps``, the same ``lr`` and decoupled ``weight_decay``; ``denominator="atan2"/"softplus"``
    changes this AdamW part only (Muon divides by nothing). Modifiers (``cautious``, ``agc``,
    ``trust_ratio``, ...) apply to both parts as to any rule. ``algorithm="auto"`` (default) splits
    each group when it is added: parameters of two or more dimensions take Muon, the others AdamW.
    A matrix stored ``(in, out)`` (transformers' ``Conv1D``) is stepped through its ``(out, in)``
    view by its parameter layout (:mod:`hfoptim.core.param_layout`, detected from the model or
    declared with ``param_layouts``): Newton-Schulz commutes with the transpose, only the
    ``original`` scale reads the orientation.
    ``hfoptim.create_optimizer(model, "muon")`` and the Trainer choose by role instead (see
    :mod:`hfoptim.roles`: embeddings, the output head, norms and biases take AdamW).

    Intended differences from ``torch.optim.Muon`` (tests/test_muon.py): the default scale is
    ``match_rms_adamw`` (torch: ``original``), the momentum buffer is kept in the group's storage
    form, 4-D kernels are accepted as matrices, and non-matrix parameters run AdamW here (torch
    refuses them).
    """

    name = "muon"
    class_name = "Muon"
    paper = "Muon is Scalable for LLM Training, arXiv 2502.16982"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "weight_decay": HP(0.1, low=0.0),
        "algorithm": HP(
            "auto",
            kind="str",
            choices=ALGORITHMS,
            doc="muon (matrices), adamw, or auto: >= 2-D parameters Muon, the others AdamW",
        ),
        "momentum": HP(0.95, low=0.0, high=1.0, high_open=True),
        "nesterov": HP(True, kind="bool"),
        "momentum_form": HP("ema", kind="str", choices=("ema", "sum"), doc="ema: torch/Jordan; sum: Moonlight"),
        "ns_steps": HP(5, kind="int", low=1, high=99),
        "ns_coefficients": HP(NS_COEFFICIENTS, kind="floats", length=3, doc="quintic Newton-Schulz (a, b, c)"),
        "ns_eps": HP(1e-7, low=0.0, low_open=True, doc="floor of the Frobenius norm before Newton-Schulz"),
        "ns_dtype": HP("bf16", kind="str", choices=("bf16", "fp32", "param")),
        "update_scale": HP("match_rms_adamw", kind="str", choices=("match_rms_adamw", "original")),
        "betas": betas((0.9, 0.95), doc="AdamW's betas for the non-matrix parameters"),
        "eps": HP(1e-8, low=0.0, doc="AdamW's eps for the non-matrix parameters"),
    }
    slots = (
        Slot("momentum_buffer", FIRST_MOMENT, when=_is_muon),
        Slot("exp_avg", FIRST_MOMENT, when=_is_adamw),
        Slot("exp_avg_sq", SECOND_MOMENT, when=_is_adamw),
    )
    preconditioned = True  # the AdamW part takes denominator="atan2"/"softplus"

    stable_decay_applies = False  # the matrices' steps divide by no second moment

    def split_group(self, options, params):
        algorithm = options["algorithm"]
        if algorithm == "auto":
            matrices = [p for p in params if p.dim() >= 2]
            others = [p for p in params if p.dim() < 2]
            parts = [({**options, "algorithm": "muon"}, matrices)] if matrices else []
            if others or not parts:
                parts.append(({**options, "algorithm": "adamw"}, others))
            return parts
        if algorithm == "muon":
            flat = [tuple(p.shape) for p in params if p.dim() < 2]
            if flat:
                raise HyperparameterError(
                    f"algorithm='muon' orthogonalizes matrices, but the group holds parameters of shape "
                    f"{', '.join(map(str, flat[:5]))}: give them algorithm='adamw' (or 'auto')"
                )
        return [(options, params)]

    def compiles(self, group):
        return not _is_muon(group)

    def update(self, ctx, p, g, s):
        group = ctx.group
        if group["algorithm"] == "adamw":
            b1, b2 = group["betas"]
            s.exp_avg.lerp_(g, 1 - b1)
            s.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            return ctx.adam_direction(s.exp_avg, s.exp_avg_sq, b1, b2, group["eps"])
        for view in ctx.views:
            if len(view.global_shape) < 2:
                raise RuntimeError(
                    f"Muon got a parameter of shape {tuple(view.global_shape)} in a group with algorithm='muon': "
                    f"only matrices can be orthogonalized; put it in a group with algorithm='adamw'"
                )
        mu = group["momentum"]
        buf = s.momentum_buffer
        if group["momentum_form"] == "ema":
            buf.lerp_(g, 1 - mu)
            direction = g.clone().lerp_(buf, mu) if group["nesterov"] else buf
        else:
            buf.mul_(mu).add_(g)
            direction = (g + buf * mu) if group["nesterov"] else buf
        compute = g[0].dtype if len(g) else torch.float32
        wire = NS_DTYPES.get(group["ns_dtype"], compute)
        ns = partial(newton_schulz, steps=group["ns_steps"], coefficients=group["ns_coefficients"], eps=group["ns_eps"])
        ortho = ctx.matrix_map(ns, direction.to(wire)).to(compute)
        scales = [update_scale(v.global_shape, group["update_scale"]) for v in ctx.views]
        return ortho.mul_(scales[0] if all(x == scales[0] for x in scales) else scales)
