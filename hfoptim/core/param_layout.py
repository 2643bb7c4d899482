"""What each axis of a weight means: output units, input features, a batch of matrices.

Every per-unit and per-matrix statistic in the kit (gradient centralization, AGC and soft
clipping per output unit, the shared and factored second moments, SMMF's matricization, the
per-tensor norms of nSGDA/LAMB/Amos, Amos's fan-in, 8-bit rows) is defined for a torch
``Linear`` weight ``(out, in)``: output units along dim 0, input features along dim 1. Two common
kinds of weights store their axes otherwise:

* transformers' ``Conv1D`` (GPT-2 and its family) stores ``(in, out)``;
* fused expert tensors (transformers 5's Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: the
  ``*Experts`` modules) store ``E`` independent matrices ``(E, out, in)`` (``(E, in, out)``
  when the module's ``is_transposed`` is set), and their biases ``E`` vectors ``(E, out)``;
  ViT's position embeddings ``(1, n, d)`` and class token ``(1, 1, d)`` are one matrix behind a
  leading axis of size 1.

A :class:`ParamLayout` says how to see a parameter as the canonical ``(batch..., out, in,
*kernel)``: ``batch`` leading axes of independent matrices, then the matrix, whose two axes are
swapped when ``transposed``. The engine steps a parameter through that view (a transposed view of
a ``Conv1D`` weight, one unit per expert of a fused tensor; :mod:`hfoptim.core.layout`), so a
``Conv1D`` weight is stepped exactly as the same ``Linear`` weight and a fused expert tensor
exactly as ``E`` separate matrices by every rule, storage form and modifier.

:func:`detect` decides the layouts once from a model's modules (what :func:`hfoptim.create_optimizer`
and the Trainer integration do); where no module is seen (a plain parameter list) the user
declares them by parameter name or tensor with the ``param_layouts`` option, and every other
parameter is torch's ``(out, in)`` (:data:`OUT_IN`).

This module only describes layouts; it imports nothing from the rest of the kit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamLayout:
    """How a parameter's axes map to the canonical ``(batch..., out, in, *kernel)``.

    Attributes:
        batch: leading axes that index independent matrices (1 for a fused expert tensor).
        transposed: the two axes after the batch axes are ``(in, out)`` (``Conv1D``).
        kind: what the kit saw (``"linear"``, ``"conv1d"``, ``"experts"``, ``"embedding"``,
            ``"batched"``, ``"declared"``); for messages, never for math.
    """

    batch: int = 0
    transposed: bool = False
    kind: str = "linear"

    @property
    def is_default(self) -> bool:
        """True for torch's ``(out, in)``: the parameter is stepped as it is stored."""
        return self.batch == 0 and not self.transposed

    def canonical_shape(self, shape) -> tuple[int, ...]:
        """The shape of ONE canonical matrix of a parameter of ``shape``: the batch axes dropped,
        ``(in, out)`` swapped to ``(out, in)``."""
        shape = tuple(shape)
        if len(shape) < self.batch:
            raise ValueError(f"a layout with {self.batch} batch axes does not fit a parameter of shape {shape}")
        inner = shape[self.batch :]
        if self.transposed and len(inner) >= 2:
            inner = (inner[1], inner[0], *inner[2:])
        return inner

    def batch_size(self, shape) -> int:
        """The number of matrices (1 without batch axes)."""
        n = 1
        for size in tuple(shape)[: self.batch]:
            n *= size
        return n

    def check(self, shape, where: str) -> None:
        """Raise ``ValueError`` when the layout cannot describe a parameter of ``shape``."""
        shape = tuple(shape)
        if len(shape) < self.batch:
            raise ValueError(
                f"{where}: layout {self.spelling!r} has {self.batch} batch axes, the parameter has shape {shape}"
            )
        if self.transposed and len(shape) - self.batch < 2:
            raise ValueError(
                f"{where}: layout {self.spelling!r} swaps (in, out), the parameter of shape {shape} has no matrix "
                f"after its batch axes"
            )

    @property
    def spelling(self) -> str:
        """The string that declares this layout (see :data:`SPELLINGS`)."""
        return ("batch_" * self.batch) + ("in_out" if self.transposed else "out_in")


#: torch's ``Linear`` ``(out, in)``: the default for every parameter
OUT_IN = ParamLayout()
#: transformers' ``Conv1D`` ``(in, out)``
IN_OUT = ParamLayout(transposed=True, kind="conv1d")
#: fused experts ``(E, out, in)``, their biases ``(E, out)``
EXPERTS = ParamLayout(batch=1, kind="experts")
#: fused experts stored ``(E, in, out)`` (``is_transposed`` expert modules)
EXPERTS_IN_OUT = ParamLayout(batch=1, transposed=True, kind="experts")

#: what a user may write in ``param_layouts``
SPELLINGS = {
    "out_in": OUT_IN,
    "in_out": ParamLayout(transposed=True, kind="declared"),
    "batch_out_in": ParamLayout(batch=1, kind="declared"),
    "batch_in_out": ParamLayout(batch=1, transposed=True, kind="declared"),
}


def parse(value, where: str) -> ParamLayout:
    """A declared layout: a :class:`ParamLayout` or one of :data:`SPELLINGS`."""
    if isinstance(value, ParamLayout):
        return value
    if isinstance(value, str) and value in SPELLINGS:
        return SPELLINGS[value]
    raise ValueError(
        f"{where}: unknown parameter layout {value!r}; declare one of {', '.join(repr(s) for s in SPELLINGS)} "
        f"(torch's Linear is 'out_in', transformers' Conv1D 'in_out', fused experts (E, out, in) 'batch_out_in') "
        f"or a hfoptim.ParamLayout"
    )


def _is_conv1d(module: torch.nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _is_experts(module: torch.nn.Module) -> bool:
    # transformers 5's fused expert modules (MixtralExperts, Qwen2MoeExperts, OlmoeExperts, ...)
    return type(module).__name__.endswith("Experts") and any(p.dim() == 3 for p in module.parameters(recurse=False))


_PLAIN = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)
_CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d)


def detect(model: torch.nn.Module) -> dict[str, ParamLayout]:
    """The layouts of a model's parameters that are not torch's ``(out, in)``, by parameter name
    (as ``model.named_parameters()`` spells it; a tied parameter under its first name).

    * ``Conv1D.weight`` -> :data:`IN_OUT`;
    * a 3-D parameter of an ``*Experts`` module -> :data:`EXPERTS` (:data:`EXPERTS_IN_OUT` when
      the module's ``is_transposed`` is set), its 2-D biases ``(E, out)`` -> a batch of vectors;
    * a 3+-D parameter held directly by another module (not a ``Linear``, embedding, norm or
      convolution) whose leading axes have size 1 (ViT's ``(1, n, d)`` position embeddings and
      ``(1, 1, d)`` class token) -> those axes as batch axes.
    """
    out: dict[str, ParamLayout] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            layout = _layout_of(module, name, p)
            if layout is not None and not layout.is_default:
                out[prefix + name] = layout
    return out


def _layout_of(module: torch.nn.Module, name: str, p: torch.Tensor) -> ParamLayout | None:
    if _is_conv1d(module):
        return IN_OUT if name == "weight" and p.dim() == 2 else None
    if _is_experts(module):
        if p.dim() == 3:
            return EXPERTS_IN_OUT if getattr(module, "is_transposed", False) else EXPERTS
        if p.dim() == 2:
            return ParamLayout(batch=1, kind="experts")
        return None
    if isinstance(module, _PLAIN + _CONV) or p.dim() < 3:
        return None
    ones = 0
    while ones < p.dim() - 2 and p.shape[ones] == 1:
        ones += 1
    return ParamLayout(batch=ones, kind="batched") if ones else None
