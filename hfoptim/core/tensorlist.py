"""A list of tensors with arithmetic applied to every member at once.

Rules are written once against :class:`TensorList`. The engine builds lists in two ways:

* ``foreach=True`` (the fast path): every operation is one ``torch._foreach_*`` call over all
  tensors of a bucket (same device and dtype);
* ``foreach=False`` (the reference path): every operation is an ordinary per-tensor call in a
  Python loop. The engine uses it with one parameter per list.

Both paths run the same rule code, so an algorithm is never written twice.

Scalar arguments may be a Python number (same for every tensor), a ``list`` of numbers (one per
tensor, e.g. a bias correction from per-parameter step counts) or a ``list`` of 0-d tensors (one
per tensor, e.g. a per-tensor norm).

Division by Python numbers is multiplication by their reciprocals (computed in float64): on CPU
a vector division costs several multiplications, and bias corrections divide every element of
every moment on every step. The result differs from true division by at most one ulp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from .tracing import is_traced

Scalar = Union[float, int]
Arg = Union["TensorList", Sequence, Scalar, torch.Tensor]

# foreach kernels that exist in torch and accept the argument kinds used below
_FOREACH = {
    name
    for name in (
        "add",
        "sub",
        "mul",
        "div",
        "addcmul",
        "addcdiv",
        "lerp",
        "sqrt",
        "abs",
        "neg",
        "sign",
        "maximum",
        "minimum",
        "clamp_min",
        "clamp_max",
        "exp",
        "log",
        "sigmoid",
        "tanh",
        "reciprocal",
        "pow",
        "rsqrt",
        "log1p",
    )
    if hasattr(torch, f"_foreach_{name}")
}


#: foreach kernels without an inductor lowering: traced, the per-tensor loop is used instead
_UNLOWERED = frozenset({"sigmoid"})


def _is_number(arg) -> bool:
    """A Python int or float (not a bool, not a tensor)."""
    return isinstance(arg, (int, float)) and not isinstance(arg, bool)


def _reciprocal(arg):
    """``1 / arg`` for a Python number or a list of them; None for anything else (tensors,
    TensorLists), which keep true division."""
    if _is_number(arg):
        return 1.0 / arg
    if isinstance(arg, (list, tuple)) and arg and all(_is_number(v) for v in arg):
        return [1.0 / v for v in arg]
    return None


def _is_uniform(values: Sequence) -> bool:
    first = values[0]
    return not isinstance(first, torch.Tensor) and all(v == first for v in values)


class TensorList:
    """Tensors that are updated together. See the module docstring."""

    __slots__ = ("tensors", "foreach")

    def __init__(self, tensors: Sequence[torch.Tensor], foreach: bool = True):
        self.tensors = list(tensors)
        self.foreach = foreach

    # ----------------------------------------------------------------- plumbing
    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensors[i]

    def __repr__(self) -> str:
        shapes = [tuple(t.shape) for t in self.tensors]
        return f"TensorList({shapes}, foreach={self.foreach})"

    def _new(self, tensors) -> TensorList:
        return TensorList(tensors, self.foreach)

    def _foreach_arg(self, arg):
        if isinstance(arg, TensorList):
            return arg.tensors
        if isinstance(arg, (list, tuple)):
            if _is_uniform(arg):
                return arg[0]
            return list(arg)
        return arg

    def _item(self, arg, i: int):
        if isinstance(arg, TensorList):
            return arg.tensors[i]
        if isinstance(arg, (list, tuple)):
            return arg[i]
        return arg

    def _run(self, name: str, inplace: bool, *args, **kwargs):
        """Apply ``torch.<name>`` (or its ``_foreach`` form) to every tensor."""
        # under torch.compile a 0-d tensor argument (a traced step or learning rate) turns some
        # foreach kernels into a graph break (.item()), and some have no inductor lowering
        # (``_foreach_sigmoid_`` ran as a library call writing a full-size buffer): the loop
        # traces, and inductor fuses it. (Not every op: torch 2.13's inductor drops an in-place
        # update of a 0-d float64 input made by a tensor method, which the foreach form keeps.)
        traced = is_traced()
        loop = traced and (name in _UNLOWERED or any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())))
        if self.foreach and name in _FOREACH and not loop:
            fn = getattr(torch, f"_foreach_{name}_" if inplace else f"_foreach_{name}")
            fargs = [self._foreach_arg(a) for a in args]
            try:
                out = fn(self.tensors, *fargs, **kwargs)
            except (RuntimeError, TypeError):
                pass  # an argument kind this kernel lacks (e.g. 0-d tensors): loop below
            else:
                return self if inplace else self._new(out)
        results = []
        for i, t in enumerate(self.tensors):
            targs = [self._item(a, i) for a in args]
            if inplace:
                method = getattr(t, f"{name}_", None)
                if method is None:  # no in-place method (e.g. maximum): compute, then write back
                    t.copy_(getattr(torch, name)(t, *targs, **kwargs))
                else:
                    method(*targs, **kwargs)
            else:
                results.append(getattr(torch, name)(t, *targs, **kwargs))
        return self if inplace else self._new(results)

    # ----------------------------------------------------------------- in place
    def add_(self, other: Arg, alpha: Scalar = 1) -> TensorList:
        if alpha == 1:
            return self._run("add", True, other)
        return self._run("add", True, other, alpha=alpha)

    def sub_(self, other: Arg, alpha: Scalar = 1) -> TensorList:
        if alpha == 1:
            return self._run("sub", True, other)
        return self._run("sub", True, other, alpha=alpha)

    def add_scaled_(self, other: TensorList, weight: Arg) -> TensorList:
        """``self += weight * other``; one fused pass (no ``weight * other`` temporary) when
        ``weight`` is one number for every tensor."""
        if isinstance(weight, (list, tuple)) and _is_uniform(weight):
            weight = weight[0]
        if _is_number(weight):
            return self.add_(other, alpha=weight)
        return self.add_(other * weight)

    def mul_(self, other: Arg) -> TensorList:
        return self._run("mul", True, other)

    def rsub_(self, other: TensorList) -> TensorList:
        """``self = other - self`` in one pass, in self's memory (no temporary)."""
        for t, o in zip(self.tensors, other.tensors):
            torch.sub(o, t, out=t)
        return self

    def rdiv_(self, other: TensorList) -> TensorList:
        """``self = other / self`` in one pass, in self's memory (no temporary)."""
        for t, o in zip(self.tensors, other.tensors):
            torch.div(o, t, out=t)
        return self

    def set_scaled_(self, other: TensorList, scale: Arg) -> TensorList:
        """``self = other * scale`` in one pass, in self's memory (no temporary)."""
        for i, (t, o) in enumerate(zip(self.tensors, other.tensors)):
            torch.mul(o, self._item(scale, i), out=t)
        return self

    def div_(self, other: Arg) -> TensorList:
        inverse = _reciprocal(other)
        if inverse is not None:
            return self._run("mul", True, inverse)
        return self._run("div", True, other)

    def addcmul_(self, a: TensorList, b: TensorList, value: Arg = 1) -> TensorList:
        return self._per_value_op("addcmul", a, b, value)

    def addcdiv_(self, a: TensorList, b: TensorList, value: Arg = 1) -> TensorList:
        return self._per_value_op("addcdiv", a, b, value)

    def _per_value_op(self, name, a, b, value):
        if isinstance(value, (list, tuple)) and not _is_uniform(value):
            # traced 0-d tensor values (Adafactor's 1 - beta2_t): the loop (no foreach kernel takes them)
            if self.foreach and not any(isinstance(v, torch.Tensor) for v in value):
                getattr(torch, f"_foreach_{name}_")(self.tensors, a.tensors, b.tensors, list(value))
            else:
                for t, x, y, v in zip(self.tensors, a.tensors, b.tensors, value):
                    if isinstance(v, torch.Tensor):  # a value argument is a number: no 0-d tensor
                        t.add_((x * y if name == "addcmul" else x / y) * v)
                    else:
                        getattr(t, f"{name}_")(x, y, value=v)
            return self
        if isinstance(value, (list, tuple)):
            value = value[0]
        return self._run(name, True, a, b, value=value)

    def lerp_(self, end: TensorList, weight: Arg) -> TensorList:
        """``self += weight * (end - self)``: an exponential moving average step."""
        return self._run("lerp", True, end, weight)

    def copy_(self, other: TensorList) -> TensorList:
        if self.foreach:
            torch._foreach_copy_(self.tensors, other.tensors)
        else:
            for t, o in zip(self.tensors, other.tensors):
                t.copy_(o)
        return self

    def zero_(self) -> TensorList:
        if self.foreach:
            torch._foreach_zero_(self.tensors)
        else:
            for t in self.tensors:
                t.zero_()
        return self

    def sqrt_(self) -> TensorList:
        return self._run("sqrt", True)

    def abs_(self) -> TensorList:
        return self._run("abs", True)

    def neg_(self) -> TensorList:
        return self._run("neg", True)

    def clamp_min_(self, value: Arg) -> TensorList:
        return self._run("clamp_min", True, value)

    def clamp_max_(self, value: Arg) -> TensorList:
        return self._run("clamp_max", True, value)

    def maximum_(self, other: TensorList) -> TensorList:
        return self._run("maximum", True, other)

    # ----------------------------------------------------------------- new lists
    def clone(self) -> TensorList:
        return self._new([t.clone() for t in self.tensors])

    def plus_scaled(self, other: TensorList, weight: Arg) -> TensorList:
        """A new list ``self + weight * other``; one pass (no ``weight * other`` temporary) when
        ``weight`` is one number for every tensor."""
        if isinstance(weight, (list, tuple)) and _is_uniform(weight):
            weight = weight[0]
        if _is_number(weight):
            return self._run("add", False, other, alpha=weight)
        return self + other * weight

    def __add__(self, other: Arg) -> TensorList:
        return self._run("add", False, other)

    __radd__ = __add__

    def __sub__(self, other: Arg) -> TensorList:
        return self._run("sub", False, other)

    def __rsub__(self, other: Arg) -> TensorList:
        return self.neg().add_(other)

    def __mul__(self, other: Arg) -> TensorList:
        return self._run("mul", False, other)

    __rmul__ = __mul__

    def __truediv__(self, other: Arg) -> TensorList:
        inverse = _reciprocal(other)
        if inverse is not None:
            return self._run("mul", False, inverse)
        return self._run("div", False, other)

    def __neg__(self) -> TensorList:
        return self._run("neg", False)

    def neg(self) -> TensorList:
        return self._run("neg", False)

    def abs(self) -> TensorList:
        return self._run("abs", False)

    def sqrt(self) -> TensorList:
        return self._run("sqrt", False)

    def sign(self) -> TensorList:
        return self._run("sign", False)

    def square(self) -> TensorList:
        return self._run("mul", False, self)

    def maximum(self, other: Arg) -> TensorList:
        return self._run("maximum", False, other)

    def minimum(self, other: Arg) -> TensorList:
        return self._run("minimum", False, other)

    def clamp_min(self, value: Arg) -> TensorList:
        return self._run("clamp_min", False, value)

    def sigmoid(self) -> TensorList:
        return self._run("sigmoid", False)

    def sigmoid_(self) -> TensorList:
        return self._run("sigmoid", True)

    def atan2(self, other: TensorList) -> TensorList:
        return self._new([torch.atan2(a, b) for a, b in zip(self.tensors, other.tensors)])

    def atan2_(self, other: TensorList) -> TensorList:
        """``self = atan2(self, other)`` in place."""
        for t, o in zip(self.tensors, other.tensors):
            t.atan2_(o)
        return self

    def ratan2_(self, other: TensorList) -> TensorList:
        """``self = atan2(other, self)`` in one pass, in self's memory (no temporary)."""
        for t, o in zip(self.tensors, other.tensors):
            torch.atan2(o, t, out=t)
        return self

    def softplus(self, beta: float = 1.0) -> TensorList:
        """``log(1 + exp(beta x)) / beta``."""
        return self._new([torch.nn.functional.softplus(t, beta=beta) for t in self.tensors])

    def where(self, mask: TensorList, other: Arg) -> TensorList:
        """Elementwise ``self if mask else other``."""
        return self._new(
            [torch.where(m, t, self._item(other, i)) for i, (t, m) in enumerate(zip(self.tensors, mask.tensors))]
        )

    def map(self, fn) -> TensorList:
        """Apply ``fn`` to each tensor (for operations without a foreach kernel)."""
        return self._new([fn(t) for t in self.tensors])

    def gt(self, other: Arg) -> TensorList:
        return self._new([torch.gt(t, self._item(other, i)) for i, t in enumerate(self.tensors)])

    def to(self, dtype: torch.dtype) -> TensorList:
        return self._new([t.to(dtype) for t in self.tensors])

    # ----------------------------------------------------------------- tensors on the left
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``tensor <op> tensorlist`` (a 0-d tensor scalar on the left), and the form
        ``torch.compile`` gives ``tensorlist <op> tensor``: torch hands the operator here as a
        Tensor method with the tensor first; it is answered by the TensorList operator."""
        name = getattr(func, "__name__", "")
        if kwargs or len(args) != 2 or not isinstance(args[1], TensorList) or isinstance(args[0], TensorList):
            return NotImplemented
        scalar, tl = args
        if name in _SAME_ORDER:  # tensorlist <op> scalar, handed over as Tensor.__r<op>__(scalar, tensorlist)
            return getattr(tl, _SAME_ORDER[name])(scalar)
        if name in _COMMUTATIVE:
            return getattr(tl, _COMMUTATIVE[name])(scalar)
        if name in ("sub", "__sub__"):  # scalar - tensorlist
            return tl.__rsub__(scalar)
        return NotImplemented


#: Tensor methods that mean ``tensorlist <op> scalar`` when called as ``method(scalar, tensorlist)``
_SAME_ORDER = {"__rdiv__": "__truediv__", "__rtruediv__": "__truediv__", "__rsub__": "__sub__"}
#: commutative operators: ``method(scalar, tensorlist)`` is ``tensorlist <op> scalar``
_COMMUTATIVE = {
    "mul": "__mul__",
    "__mul__": "__mul__",
    "__rmul__": "__mul__",
    "add": "__add__",
    "__add__": "__add__",
    "__radd__": "__add__",
}
