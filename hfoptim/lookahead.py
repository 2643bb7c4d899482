r"""Lookahead: a wrapper that pulls the weights back toward slowly moving copies every k steps.

Lookahead (Zhang, Lucas, Hinton, Ba 2019, "Lookahead Optimizer: k steps forward, 1 step back",
arXiv 1907.08610, Algorithm 1). With fast weights :math:`\theta` (the model's parameters, moved
by the inner optimizer every step) and slow weights :math:`\phi` (:math:`\phi_0 = \theta_0`),
after every k-th step:

.. math::
    \phi \leftarrow \phi + \alpha (\theta - \phi), \qquad \theta \leftarrow \phi

Defaults k = 5, alpha = 0.5 (the paper's and pytorch_optimizer's).

The wrapper works over any ``torch.optim.Optimizer`` (hfoptim or torch). It is itself one, and
exposes the inner optimizer's ``param_groups``, ``state`` and ``defaults``, so LR schedulers,
GradScaler, accelerate and the HF Trainer drive it like the inner optimizer.

* Slow weights are created lazily, on a parameter's first step (its value before the inner
  step, i.e. :math:`\theta_0`), never in ``__init__``: accelerate may swap the parameters after
  the optimizer is built. bf16/fp16 parameters keep fp32 slow weights.
* Each parameter counts its own steps (the steps in which it had a gradient) and syncs after
  every k-th of them, like the engine's per-parameter step counter: DeepSpeed ZeRO-3 calls
  ``step()`` once per sub-group, so one counter of ``step()`` calls would sync too often.
* A step the inner optimizer skips (an hfoptim optimizer's ``skip_nonfinite``: a gradient was
  not finite) is no step for Lookahead either: no slow weights are created, no count advances.
* Hooks behave as on any torch optimizer: hooks registered on the wrapper with
  ``register_step_pre_hook`` / ``register_state_dict_pre_hook`` / ... run around its
  ``step`` / ``state_dict`` / ``load_state_dict``; global step hooks
  (``torch.optim.optimizer.register_optimizer_step_pre_hook``) fire once per Lookahead step
  (with the wrapper as the optimizer), not a second time for the inner step; hooks registered on
  the inner optimizer still run.
* ``state_dict()`` is the inner optimizer's, plus ``"lookahead_slow"`` (slow weights) and
  ``"lookahead_step"`` (the parameter's count) in each parameter's ``state`` entry and
  ``lookahead_k`` / ``lookahead_alpha`` in every ``param_groups`` entry, so tools that reshard
  per-parameter state and keep group options (distributed checkpoints) carry them.
  ``load_state_dict`` restores all of it exactly (k and alpha included, as torch restores group
  hyperparameters) and raises ``ValueError`` for a state dict without Lookahead entries or with
  slow weights of other shapes.

Intended difference from pytorch_optimizer's ``Lookahead``: it copies the slow weights in
``__init__`` (ours: at the first step) and counts ``step()`` calls per parameter group (ours:
steps per parameter; the same when every parameter gets a gradient every step); it also offers
momentum "pullback"/"reset" options that this wrapper does not.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from typing import Any

import torch

from .core.hparams import HyperparameterError

SLOW_KEY = "lookahead_slow"
STEP_KEY = "lookahead_step"
GROUP_KEYS = ("lookahead_k", "lookahead_alpha")


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise HyperparameterError(f"invalid Lookahead k={k!r}: expected an integer >= 1 (steps between syncs)")
    return k


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) <= 1.0:
        raise HyperparameterError(f"invalid Lookahead alpha={alpha!r}: expected a number with 0 < alpha <= 1")
    return float(alpha)


class Lookahead(torch.optim.Optimizer):
    """Wrap ``optimizer`` with Lookahead (see the module docstring).

    Args:
        optimizer: the inner ("fast") optimizer, any ``torch.optim.Optimizer``.
        k: inner steps between two syncs of the slow weights (an integer >= 1).
        alpha: slow-weight step size, 0 < alpha <= 1 (1: plain inner optimizer).

    ``step(closure=None, **kwargs)`` passes everything to the inner optimizer's ``step`` (e.g.
    ``loss=`` for rules that need the loss) and returns what it returns.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.k = _check_k(k)
        self.alpha = _check_alpha(alpha)
        self.optimizer = optimizer
        #: slow weights by parameter, created on a parameter's first step
        self.slow: dict[torch.Tensor, torch.Tensor] = {}
        #: steps taken by each parameter; it syncs when its count is a multiple of k
        self.steps: dict[torch.Tensor, int] = {}
        # what torch.optim.Optimizer.__init__ sets up, without building parameter groups of our own
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # ------------------------------------------------------------------ the inner optimizer's view
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> defaultdict:
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ step
    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    @staticmethod
    @torch.no_grad()
    def _copy(p: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        return p.detach().to(dtype=dtype, copy=True)

    @property
    def nonfinite_skips(self) -> int:
        """Steps the inner optimizer skipped for non-finite gradients (0 for one that never skips)."""
        return getattr(self.optimizer, "nonfinite_skips", 0)

    def _inner_step(self, closure, kwargs):
        """The inner optimizer's step with its own hooks but without the global ones: those fired
        for this wrapper's step already (torch wraps every optimizer class's ``step``)."""
        inner = self.optimizer
        args = (inner, closure)
        step = type(inner).step
        raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
        if raw is None or "step" in vars(inner):  # not torch's wrapper, or patched on the instance
            return inner.step(closure, **kwargs) if kwargs else inner.step(closure)
        for hook in list(inner._optimizer_step_pre_hooks.values()):
            result = hook(inner, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or (args, kwargs), got {result!r}")
                args, kwargs = result
        out = raw(*args, **kwargs)
        inner._optimizer_step_code()
        for hook in list(inner._optimizer_step_post_hooks.values()):
            hook(inner, args, kwargs)
        return out

    def step(self, closure=None, **kwargs):
        """One inner step; a parameter that has taken k more steps since its last sync then gets
        ``slow += alpha (fast - slow)`` and ``fast = slow``."""
        # slow weights start as the value before a parameter's first step; with a closure the
        # gradients appear only inside the inner step, so snapshot every parameter still lacking
        # slow weights and keep the copies of those that got a gradient
        new = [p for p in self._params() if p not in self.slow and (closure is not None or p.grad is not None)]
        copies = [self._copy(p) for p in new]
        skips = self.nonfinite_skips
        result = self._inner_step(closure, kwargs)
        if self.nonfinite_skips != skips:  # the inner optimizer skipped: nothing moved
            return result
        for p, copy in zip(new, copies):
            if p.grad is not None:
                self.slow[p] = copy
        due = []
        for p in self._params():
            if p.grad is not None and p in self.slow:
                self.steps[p] = self.steps.get(p, 0) + 1
                if self.steps[p] % self.k == 0:
                    due.append(p)
        self.sync(due)
        return result

    @torch.no_grad()
    def sync(self, params: list[torch.Tensor] | None = None) -> None:
        """Move the slow weights of ``params`` (default: all that have some) toward the fast
        ones and reset the fast weights to them."""
        params = list(self._params()) if params is None else params
        buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for p in params:
            slow = self.slow.get(p)
            if slow is not None:
                buckets[(slow.device, slow.dtype, p.dtype)].append((p, slow))
        for (_, dtype, p_dtype), pairs in buckets.items():
            params = [p for p, _ in pairs]
            slows = [s for _, s in pairs]
            fast = params if p_dtype == dtype else [p.to(dtype) for p in params]
            torch._foreach_lerp_(slows, fast, self.alpha)
            for p, s in pairs:
                p.copy_(s)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict with the Lookahead entries (see the module
        docstring); state-dict hooks registered on this wrapper run as torch runs them."""
        for hook in list(self._optimizer_state_dict_pre_hooks.values()):
            hook(self)
        sd = self._state_dict()
        for hook in list(self._optimizer_state_dict_post_hooks.values()):
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        state = dict(sd["state"])
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.slow:
                    entry = dict(state.get(index, {}))
                    entry[SLOW_KEY] = self.slow[p]
                    entry[STEP_KEY] = torch.tensor(self.steps.get(p, 0), dtype=torch.int64)
                    state[index] = entry
                index += 1
        groups = [{**g, "lookahead_k": self.k, "lookahead_alpha": self.alpha} for g in sd["param_groups"]]
        return {**sd, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by a Lookahead over the same parameters (see the module
        docstring); load-state-dict hooks registered on this wrapper run as torch runs them."""
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups")
        if not groups or any(key not in g for g in groups for key in GROUP_KEYS):
            raise ValueError(
                "this state_dict was not saved by hfoptim.Lookahead (its param_groups lack "
                f"{', '.join(GROUP_KEYS)}); load it into the inner optimizer instead"
            )
        k, alpha = (groups[0][key] for key in GROUP_KEYS)
        if any((g["lookahead_k"], g["lookahead_alpha"]) != (k, alpha) for g in groups):
            raise ValueError("inconsistent Lookahead entries across param_groups of this state_dict")
        k, alpha = _check_k(k), _check_alpha(alpha)
        params = list(self._params())
        slow: dict[torch.Tensor, torch.Tensor] = {}
        steps: dict[torch.Tensor, int] = {}
        inner_state = {}
        for pid, entry in state_dict["state"].items():
            entry = dict(entry)
            saved_slow = entry.pop(SLOW_KEY, None)
            saved_step = entry.pop(STEP_KEY, None)
            if (saved_slow is None) != (saved_step is None):
                raise ValueError(f"state_dict entry {pid!r} has only one of {SLOW_KEY!r} and {STEP_KEY!r}")
            if saved_slow is not None:
                if not isinstance(pid, int) or not 0 <= pid < len(params):
                    raise ValueError(f"state_dict has Lookahead slow weights for unknown parameter id {pid!r}")
                p = params[pid]
                if tuple(saved_slow.shape) != tuple(p.shape):
                    raise ValueError(
                        f"state_dict slow weights for parameter {pid} have shape {tuple(saved_slow.shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
                slow[p] = saved_slow.to(device=p.device, copy=True)
                steps[p] = int(saved_step)
            if entry:
                inner_state[pid] = entry
        inner_groups = [{key: v for key, v in g.items() if key not in GROUP_KEYS} for g in groups]
        self.optimizer.load_state_dict({**state_dict, "state": inner_state, "param_groups": inner_groups})
        self.k, self.alpha, self.slow, self.steps = k, alpha, slow, steps
