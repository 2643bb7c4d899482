"""Parameter roles: which parameters of a model are hidden weight matrices.

Muon orthogonalizes the update of hidden matrices only; embeddings, the output head, norms,
biases and every parameter of fewer than two dimensions take AdamW (Jordan 2024; Liu et al.
2025). With a model at hand the role comes from the module that owns the parameter:

* ``embedding``: parameters of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules;
* ``head``: the weight of ``model.get_output_embeddings()`` (HF models; a tied head is the
  embedding's own parameter);
* ``norm``: parameters of normalization modules (torch's norm layers, any module whose class
  name contains ``Norm``, e.g. ``LlamaRMSNorm``);
* ``bias``: parameters named ``bias``, and any parameter of fewer than two dimensions;
* ``matrix``: everything else of two or more dimensions (a ``(out, in, k, k)`` kernel is the
  ``(out, in*k*k)`` matrix); transformers' ``Conv1D`` (GPT-2) stores ``(in, out)``:
  ``matrix_in_out``.

``adamw_params`` / ``muon_params`` (regular expressions searched in parameter names) move
parameters to AdamW / Muon by name; ``muon_params`` wins. A later layouts issue (fused MoE
experts, ...) extends :func:`role_of`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

MATRIX = "matrix"
MATRIX_IN_OUT = "matrix_in_out"
EMBEDDING, HEAD, NORM, BIAS = "embedding", "head", "norm", "bias"

#: the model-level options that choose roles (not parameter-group options)
ROLE_OPTIONS = ("adamw_params", "muon_params")

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (matched by name: no transformers import here)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def role_of(name: str, p: torch.Tensor, module: nn.Module, head: set[int]) -> str:
    """The role of parameter ``name`` (``p``) owned directly by ``module``."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return EMBEDDING
    if id(p) in head:
        return HEAD
    if _is_norm(module):
        return NORM
    if name.rsplit(".", 1)[-1] == "bias" or p.dim() < 2:
        return BIAS
    if _is_conv1d(module):
        return MATRIX_IN_OUT
    return MATRIX


def patterns(value, option: str) -> tuple[str, ...]:
    """``value`` (a regex or a sequence of them) as a tuple of compiled-checked patterns."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{option} takes regular expressions on parameter names, got {item!r}")
        try:
            re.compile(item)
        except re.error as error:
            raise ValueError(f"{option}: {item!r} is not a regular expression ({error})") from None
    return items


def model_roles(model: nn.Module) -> dict[str, str]:
    """The role of every trainable parameter of ``model``, by name."""
    head = set()
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        module = get_head()
        if module is not None:
            head = {id(p) for p in module.parameters(recurse=False)}
    roles: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            roles[name] = role_of(name, p, module, head)
    return roles


def muon_options(
    model: nn.Module, adamw_params: Iterable[str] = (), muon_params: Iterable[str] = ()
) -> dict[str, dict]:
    """Muon's group options per trainable parameter name: ``algorithm`` ("muon" for matrices,
    "adamw" for the other roles and names matching ``adamw_params``, "muon" for names matching
    ``muon_params``). A ``Conv1D`` weight's orientation is its parameter layout's
    (:mod:`hfoptim.core.param_layout`), not an option here."""
    to_adamw = patterns(adamw_params, "adamw_params")
    to_muon = patterns(muon_params, "muon_params")
    params = dict(model.named_parameters())
    out = {}
    for name, role in model_roles(model).items():
        muon = role in (MATRIX, MATRIX_IN_OUT)
        if any(re.search(x, name) for x in to_adamw):
            muon = False
        if any(re.search(x, name) for x in to_muon):
            if params[name].dim() < 2:
                raise ValueError(
                    f"muon_params matches {name!r} of shape {tuple(params[name].shape)}: Muon orthogonalizes "
                    f"matrices only; narrow the pattern"
                )
            muon = True
        options = {"algorithm": "muon" if muon else "adamw"}
        out[name] = options
    return out
