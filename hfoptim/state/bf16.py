r"""Dense bf16 state with stochastic rounding on write, for every per-element slot.

A slot is kept as a bf16 tensor of the parameter's local shape under ``"<slot>.bf16"`` (2 bytes
per element) and decoded to the compute dtype. Rounding to the nearest bf16 would lose the small
increments of a slow EMA (``b2 = 0.999`` adds 0.1% of ``g^2`` per step, below bf16's 0.4%
resolution, so the moment would stall); stochastic rounding keeps the stored value unbiased:

.. math::
    \mathrm{encode}(x) = \mathrm{trunc}_{16}\big(\mathrm{bits}(x) + r\big),\qquad
    r \sim U\{0, \dots, 2^{16}-1\}

i.e. the 16 low bits of the fp32 number are dropped after adding random bits, so ``x`` rounds up
with probability equal to its distance from the bf16 number below (in units of the last place);
``E[encode(x)] = x``. fp64 values are first rounded to fp32.

**The random bits** are a hash, not a generator's stream: ``r = hash32(i XOR key(t, slot))``
with ``i`` the element's index in the flattened WHOLE parameter, ``t`` the parameter's step
counter (kept in its state) and ``slot`` the slot's name (``hash32`` is the "lowbias32"
integer mix: xor-shift, multiply by an odd constant, twice; ``key`` mixes ``t``, an FNV-1a hash of
the slot's name and :data:`SEED`). So the rounding is reproducible without any generator state to save or restore
(a state_dict round trip continues bit-identically), independent of the device, and the same
whether or not the parameter is sharded (a shard uses the global indices of its elements).
Parameters of the same shape see the same bits at the same step: the rounding of each one is
still unbiased.
"""

from __future__ import annotations

import torch

from ..core.rule import BUFFER, FIRST_MOMENT, SECOND_MOMENT, Slot
from .codec import Codec

#: mixed into every key; change it to draw other rounding bits
SEED = 0x5EED

_MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31, so products of 32-bit values fit in int64 without overflow
_M1 = 0x7FEB352D
_M2 = 0x2C1B3C6D


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 tensors holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def rounding_bits(step: torch.Tensor | int, salt: int, offset: int, numel: int, device) -> torch.Tensor:
    """16 random bits (int32 in ``[0, 65536)``) for the elements ``offset .. offset+numel-1`` of
    a parameter at ``step``; see the module docstring."""
    if isinstance(step, torch.Tensor):
        step = step.to(device=device, dtype=torch.int64)
    key = mix32((step * 0x9E3779B1 + salt) & _MASK32)
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return (mix32((index ^ key) & _MASK32) & 0xFFFF).to(torch.int32)


def stochastic_round_bf16(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 up or down with the 16 random ``noise`` bits (int32 in
    ``[0, 65536)``, same number of elements)."""
    bits = x.contiguous().view(torch.int32).reshape(-1)
    rounded = (bits + noise) & -65536  # 0xFFFF0000: keep sign, exponent and 7 mantissa bits
    return rounded.view(torch.float32).to(torch.bfloat16).view(x.shape)


def slot_salt(slot: Slot) -> int:
    """A 32-bit number from the slot's name (FNV-1a over its characters, plain Python so that
    torch.compile folds it into a constant) and :data:`SEED`."""
    h = 0x811C9DC5
    for ch in slot.name:
        h = ((h ^ ord(ch)) * 0x01000193) & _MASK32
    return (h ^ SEED) & _MASK32


class BF16(Codec):
    """Dense bf16 with stochastic rounding; see the module docstring."""

    name = "bf16"
    #: the compiled path (hfoptim.core.compiled_step) fuses its decode and encode with the update
    fusable = True
    #: the plain path codes it tensor by tensor (see Codec.coded_per_tensor)
    coded_per_tensor = True
    kinds = frozenset({FIRST_MOMENT, SECOND_MOMENT, BUFFER})
    #: not elementwise: the rounding noise is drawn by flat position, so a Conv1D or fused expert
    #: weight is stored through its canonical view to round exactly as the same Linear matrices
    elementwise = False

    @staticmethod
    def key(slot: Slot) -> str:
        return f"{slot.name}.bf16"

    def shard_local(self, slot, view):
        """Each element is rounded on its own (its rounding bits from its global index)."""
        return True

    def rows(self, slot, stored, view, start, stop):
        # the rounding bits of an element come from its global index (view.offset): a piece's
        # view keeps its row_start, so the piece rounds exactly as the whole tensor would
        return {self.key(slot): stored[self.key(slot)][start:stop]}

    def shapes(self, slot, view, p):
        return {self.key(slot): tuple(view.local_shape)}

    def init(self, slot, value, view, *, stats=None):
        stored = {self.key(slot): torch.zeros(view.local_shape, dtype=torch.bfloat16, device=value.device)}
        self._write(slot, stored, value, view, 0)
        return stored

    def decode(self, slot, stored, view, dtype, *, stats=None):
        return stored[self.key(slot)].to(dtype)

    def encode(self, slot, stored, value, view, *, stats=None):
        self._write(slot, stored, value, view, stored.get("step", 0))

    def _write(self, slot, stored, value, view, step) -> None:
        target = stored[self.key(slot)]
        value = value.to(torch.float32)
        if target.device.type == "meta":
            return
        noise = rounding_bits(step, slot_salt(slot), view.offset, value.numel(), value.device)
        target.copy_(stochastic_round_bf16(value, noise).view(target.shape))
