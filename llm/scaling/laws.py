"""The functional forms of scaling laws, as plain values with closed-form consequences.

- `ParametricLaw`: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, Approach 3), with its
  compute-optimal allocation under C = 6 N D.
- `Frontier`: N_opt(C) = k_N C^a, with D_opt(C) = C / (6 N_opt(C)); what Approaches 1 and 2 estimate
  and what every law above implies. Planning only needs this.
- `ComputeLaw`: L(C) = E + (C_c / C)^alpha_C (Kaplan et al. 2020 fit L(C_min) without E).
- `CHINCHILLA`: the published Approach-3 parameters, for planning without a fit of one's own.

Everything is float64 and vectorised over numpy arrays (scalars work too).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Training FLOPs per parameter per token (forward + backward), the C = 6 N D convention of
# Kaplan et al. and Hoffmann et al. Every frontier here converts between C, N and D with it.
FLOPS_PER_PARAM_TOKEN = 6.0


@dataclass(frozen=True)
class Frontier:
    """Compute-optimal allocation N_opt(C) = k_N * C^a, D_opt(C) = C / (6 N_opt(C)).

    Defining D through C = 6 N D (rather than by an independent fit) makes the three
    quantities consistent: from any one of C, N, D the other two follow."""

    k_N: float
    a: float

    @property
    def b(self) -> float:
        """Exponent of D_opt(C) = k_D C^b; b = 1 - a because C = 6 N D."""
        return 1.0 - self.a

    @property
    def k_D(self) -> float:
        return 1.0 / (FLOPS_PER_PARAM_TOKEN * self.k_N)

    def params(self, flops):
        return self.k_N * np.asarray(flops, dtype=np.float64) ** self.a

    def tokens(self, flops):
        return np.asarray(flops, dtype=np.float64) / (FLOPS_PER_PARAM_TOKEN * self.params(flops))

    def flops_for_params(self, params):
        return (np.asarray(params, dtype=np.float64) / self.k_N) ** (1.0 / self.a)

    def flops_for_tokens(self, tokens):
        # D = C^(1-a) / (6 k_N)  =>  C = (6 k_N D)^(1 / (1 - a))
        return (FLOPS_PER_PARAM_TOKEN * self.k_N * np.asarray(tokens, dtype=np.float64)) ** (1.0 / self.b)


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta: an irreducible loss E plus the shortfalls of a
    finite model (N parameters) and of finite data (D tokens)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        N = np.asarray(N, dtype=np.float64)
        D = np.asarray(D, dtype=np.float64)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta)): the scale of the optimal N at C = 6.
        NaN for a law without an interior optimum (alpha + beta <= 0, or terms of opposite sign)."""
        total, numerator, denominator = self.alpha + self.beta, self.alpha * self.A, self.beta * self.B
        if total <= 0 or denominator == 0 or not numerator / denominator > 0:
            return math.nan
        return (numerator / denominator) ** (1.0 / total)

    @property
    def a(self) -> float:
        """Exponent of N_opt(C): beta / (alpha + beta)."""
        total = self.alpha + self.beta
        return self.beta / total if total else math.nan

    @property
    def b(self) -> float:
        """Exponent of D_opt(C): alpha / (alpha + beta)."""
        total = self.alpha + self.beta
        return self.alpha / total if total else math.nan

    def frontier(self) -> Frontier:
        """Minimising L(N, C / 6N) over N gives N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b."""
        return Frontier(k_N=self.G * FLOPS_PER_PARAM_TOKEN ** -self.a, a=self.a)

    def optimal(self, flops):
        """(N_opt, D_opt) at compute C."""
        c6 = np.asarray(flops, dtype=np.float64) / FLOPS_PER_PARAM_TOKEN
        return self.G * c6**self.a, c6**self.b / self.G

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ComputeLaw:
    """L(C) = E + (C_c / C)^alpha_C: the best loss reachable with C FLOPs.

    Kaplan et al. (2020) fit it with E = 0 (a pure power law); E > 0 allows an irreducible floor."""

    C_c: float
    alpha_C: float
    E: float = 0.0

    def loss(self, flops):
        return self.E + (self.C_c / np.asarray(flops, dtype=np.float64)) ** self.alpha_C


# Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models", Approach 3 (their eq. 10).
CHINCHILLA = ParametricLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def power_law_fit(x, y) -> tuple[float, float]:
    """Least squares of log y = log k + p log x; returns (k, p)."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError(f"a power law needs at least 2 distinct x values; got {len(set(lx.tolist()))}")
    p, logk = np.polyfit(lx, ly, 1)
    if not abs(logk) < 700:  # exp would overflow: x spans too little for a meaningful slope
        raise ValueError(f"power law fit degenerate (slope {p:.3g}): x spans only {lx.min():.4g}..{lx.max():.4g} in ln x")
    return math.exp(logk), float(p)
