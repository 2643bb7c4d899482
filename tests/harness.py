"""Step-by-step parity between an hfoptim optimizer and a paper-literal reference.

A reference is a small float64 class written straight from the paper, one instance per tensor:
``ref.step(p, g, loss)`` updates ``p`` in place and keeps its state in ``ref.state`` under the
same keys the library uses. :func:`check_parity` runs both for many steps on tensors of several
shapes, on the multi-tensor and the reference path, and compares parameters AND every state
tensor after every step. It also checks that ``p.grad`` is left untouched.

The library's tensors live on :data:`DEVICE`: the CPU, or the device that the environment variable
``HFOPTIM_TEST_DEVICE`` names (``HFOPTIM_TEST_DEVICE=cuda pytest tests/test_adamw.py`` runs the
same comparisons on a GPU; the references stay float64 on the CPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

#: where the library's parameters, gradients and state live in the tests that read it
DEVICE = torch.device(os.environ.get("HFOPTIM_TEST_DEVICE", "cpu"))

#: 1-D, 2-D, 4-D, and one with odd sizes
SHAPES = [(7,), (6, 4), (2, 3, 2, 2), (13, 11)]


def gradients(params: list[torch.Tensor], step: int, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic gradients that depend on the parameters (a noisy quadratic)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return [0.3 * p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def default_loss(step: int) -> float:
    return 2.0 / (1.0 + 0.1 * step)


def check_parity(
    make_optimizer: Callable[[list[torch.nn.Parameter], bool], torch.optim.Optimizer],
    make_reference: Callable[[], object],
    *,
    steps: int = 20,
    shapes=SHAPES,
    rtol: float = 1e-9,
    atol: float = 1e-12,
    seed: int = 0,
    pass_loss: bool = False,
    state_map: dict[str, str] | None = None,
    skip_state: tuple = (),
    grads_fn=gradients,
) -> None:
    """Run the library and the reference side by side and compare after every step.

    ``state_map`` renames reference state keys to library keys when they differ; every library
    state tensor other than ``step`` and those in ``skip_state`` must have a reference twin.
    """
    state_map = state_map or {}
    for foreach in (True, False):
        gen = torch.Generator().manual_seed(seed)
        initial = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        lib_params = [torch.nn.Parameter(x.to(DEVICE, copy=True)) for x in initial]
        ref_params = [x.clone() for x in initial]
        optimizer = make_optimizer(lib_params, foreach)
        refs = [make_reference() for _ in shapes]
        for t in range(1, steps + 1):
            grads = grads_fn(ref_params, t, seed)
            for p, g in zip(lib_params, grads):
                p.grad = g.to(DEVICE, copy=True)
            loss = default_loss(t)
            if pass_loss:
                optimizer.step(loss=loss)
            else:
                optimizer.step()
            for ref, p, g in zip(refs, ref_params, grads):
                ref.step(p, g.clone(), loss) if pass_loss else ref.step(p, g.clone())
            for i, (lp, rp, ref, g) in enumerate(zip(lib_params, ref_params, refs, grads)):
                where = f"foreach={foreach} step {t} tensor {i} shape {tuple(rp.shape)}"
                assert torch.equal(lp.grad.cpu(), g), f"p.grad was modified ({where})"
                torch.testing.assert_close(
                    lp.detach().cpu(), rp, rtol=rtol, atol=atol, msg=lambda m, w=where: f"param {w}: {m}"
                )
                lib_state = optimizer.state[lp]
                compared = {"step"} | set(skip_state)
                for key, value in ref.state.items():
                    lib_key = state_map.get(key, key)
                    assert lib_key in lib_state, f"library state lacks {lib_key!r} ({where}); has {sorted(lib_state)}"
                    torch.testing.assert_close(
                        lib_state[lib_key].to("cpu", torch.float64),
                        torch.as_tensor(value, dtype=torch.float64),
                        rtol=rtol,
                        atol=atol,
                        msg=lambda m, k=lib_key, w=where: f"state {k!r} {w}: {m}",
                    )
                    compared.add(lib_key)
                unchecked = set(lib_state) - compared
                assert not unchecked, f"state {sorted(unchecked)} not compared with the reference ({where})"
                assert int(lib_state["step"]) == t


def check_resume_mid_run(
    name: str,
    make_params: Callable[[], list],
    hp: dict,
    compressed_key: str,
    saved: Callable[[dict, list], dict] | None = None,
) -> None:
    """A state_dict saved after 5 steps of ``name`` and loaded into a fresh optimizer continues
    exactly as the uninterrupted run for 6 more steps (parameters and every state tensor, dtypes
    included); ``compressed_key`` (e.g. ``"exp_avg.codes"``) is stored as uint8. ``saved``
    rewrites the saved state dict (given with the parameters) before the load: a checkpoint of
    an older format, for instance."""
    import io

    import hfoptim

    def set_grads(t, params):
        gen = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)

    straight = make_params()
    opt = hfoptim.create_optimizer(straight, name, state_min_numel=256, compile="off", **hp)
    resumed = make_params()
    first = hfoptim.create_optimizer(resumed, name, state_min_numel=256, compile="off", **hp)
    for t in range(1, 6):
        set_grads(t, straight), opt.step()
        set_grads(t, resumed), first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = hfoptim.create_optimizer(resumed, name, state_min_numel=256, compile="off", **hp)
    loaded = torch.load(buffer, weights_only=False)
    second.load_state_dict(saved(loaded, resumed) if saved is not None else loaded)
    for t in range(6, 12):
        set_grads(t, straight), opt.step()
        set_grads(t, resumed), second.step()
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert value.dtype == second.state[q][key].dtype
            assert torch.equal(value, second.state[q][key]), key
    assert second.state[resumed[0]][compressed_key].dtype == torch.uint8


def interleaved(packed: torch.Tensor, view) -> torch.Tensor:
    """The 4-bit codes of ``packed`` (``hfoptim.state.fourbit.pack`` of the local tensor of the
    ParamView ``view``) in state format 1's order: elements ``2k`` and ``2k + 1`` of a line in
    byte ``k``, low four bits first (the authors' order)."""
    from hfoptim.state.fourbit import unpack

    if packed.numel() == 0:  # a shard without rows
        return packed.clone()
    lines = packed.reshape(-1, packed.shape[-1]).shape[0]
    codes = unpack(packed, view).reshape(lines, -1)
    pairs = torch.nn.functional.pad(codes, (0, codes.shape[1] % 2)).reshape(lines, -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(packed.shape)
