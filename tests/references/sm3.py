"""SM3-II (arXiv 1901.11150), float64, one tensor at a time, written from the paper's Algorithm
SM3-II with the cover {rows along each dimension}: for every element, nu = min over the
dimensions d of mu_d[i_d] plus g^2; then every mu_d[j] is the max of nu over the elements with
i_d = j. Loops over elements on purpose (no broadcasting shared with the library). ``beta > 0``:
the EMA form of google-research's / pytorch_optimizer's code (accumulators keep their maximum)."""

import itertools
import math

import torch


class SM3Ref:
    def __init__(self, lr, momentum=0.0, beta=0.0, eps=1e-30, weight_decay=0.0):
        self.lr, self.momentum, self.beta, self.eps, self.wd = lr, momentum, beta, eps, weight_decay
        self.state = {}
        # SM3-II sums (beta = 0: nu = min + g^2); the EMA form scales the old value by beta
        self._decay = beta if beta > 0 else 1.0

    def step(self, p, g):
        shape = tuple(p.shape)
        if len(shape) < 2:  # Adagrad per element
            acc = self.state.get("acc_row", torch.zeros_like(p))
            nu = self._decay * acc + (1 - self.beta) * g * g
            self.state["acc_row"] = torch.maximum(acc, nu) if self.beta > 0 else nu.clone()
        else:
            mus = self._split(shape)
            nu = torch.zeros_like(p)
            for i in itertools.product(*(range(n) for n in shape)):
                low = min(float(mus[d][i[d]]) for d in range(len(shape)))
                nu[i] = self._decay * low + (1 - self.beta) * float(g[i]) ** 2
            new = []
            for d, n in enumerate(shape):
                best = [
                    max(float(nu[i]) for i in itertools.product(*(range(m) for m in shape)) if i[d] == j)
                    for j in range(n)
                ]
                best = torch.tensor(best, dtype=p.dtype)
                new.append(torch.maximum(mus[d], best) if self.beta > 0 else best)
            self.state["acc_row"] = new[0]
            self.state["acc_rest"] = torch.cat(new[1:])
        u = g / torch.sqrt(nu + self.eps)
        if self.momentum > 0:
            b = self.state.get("momentum_buffer", torch.zeros_like(p))
            b = self.momentum * b + (1 - self.momentum) * u
            self.state["momentum_buffer"] = b
            u = b
        p -= self.lr * (u + self.wd * p)
        if len(shape) < 2:
            self.state.setdefault("acc_rest", torch.zeros(0, dtype=p.dtype))
        assert math.isfinite(float(p.sum()))

    def _split(self, shape):
        if "acc_row" not in self.state:
            return [torch.zeros(n, dtype=torch.float64) for n in shape]
        rest = self.state["acc_rest"]
        out, start = [self.state["acc_row"]], 0
        for n in shape[1:]:
            out.append(rest[start : start + n])
            start += n
        return out
