"""Step-by-step comparison of an hfoptim optimizer with an installed anchor implementation
(torch.optim, pytorch_optimizer, ...), in float64 on the harness shapes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.harness import SHAPES, gradients


def compare_with_anchor(
    make_ours: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    make_theirs: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    steps: int = 25,
    shapes=SHAPES,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    state_pairs: tuple[tuple[str, str], ...] = (),
    seed: int = 0,
) -> None:
    """Run both on the same gradients; compare parameters (and the named state pairs
    ``(our_key, their_key)``) after every step. The anchor gets its own copy of each gradient,
    since some anchors write into ``p.grad``."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    a, b = make_ours(ours), make_theirs(theirs)
    for t in range(1, steps + 1):
        grads = gradients([p.detach() for p in ours], t, seed)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            where = f"step {t} tensor {i} shape {tuple(p.shape)}"
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, w=where: f"param {w}: {m}")
            for mine, other in state_pairs:
                torch.testing.assert_close(
                    a.state[p][mine].double().reshape(-1),
                    torch.as_tensor(b.state[q][other]).double().reshape(-1),
                    rtol=rtol,
                    atol=atol,
                    msg=lambda m, w=where, k=mine: f"state {k!r} {w}: {m}",
                )
