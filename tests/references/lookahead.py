"""Lookahead, arXiv 1907.08610, Algorithm 1, around any per-tensor reference: phi_0 = theta_0;
after every k inner steps phi <- phi + alpha (theta - phi), theta <- phi."""


class LookaheadRef:
    def __init__(self, inner, k, alpha):
        self.inner, self.k, self.alpha = inner, k, alpha
        self.slow = None
        self.t = 0

    @property
    def state(self):  # the inner optimizer's state, under the library's keys
        return self.inner.state

    def step(self, p, g, *loss):
        if self.slow is None:
            self.slow = p.clone()
        self.inner.step(p, g, *loss)
        self.t += 1
        if self.t % self.k == 0:
            self.slow = self.slow + self.alpha * (p - self.slow)
            p.copy_(self.slow)
