"""Learning-rate schedules as multipliers of the base lr: f(step, total_steps) -> factor.

Each has a linear warmup; `warmup` is a fraction of the run (< 1) or a number of steps (>= 1).
"""

from __future__ import annotations

import math


def _warmup_steps(warmup: float, total: int) -> int:
    return int(warmup * total) if warmup < 1 else int(warmup)


class Constant:
    def __init__(self, warmup: float = 0.05):
        self.warmup = warmup

    def __call__(self, step: int, total: int) -> float:
        w = _warmup_steps(self.warmup, total)
        return min(1.0, (step + 1) / w) if w else 1.0


class Cosine(Constant):
    """Warmup, then cosine from 1 down to min_lr_ratio at the last step."""

    def __init__(self, warmup: float = 0.05, min_lr_ratio: float = 0.1):
        super().__init__(warmup)
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int, total: int) -> float:
        w = _warmup_steps(self.warmup, total)
        if step < w:
            return (step + 1) / w
        progress = min(1.0, (step - w) / max(1, total - w))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WSD(Constant):
    """Warmup-stable-decay (Hu et al., MiniCPM): constant lr, then decay over the last
    decay_fraction of the run. `branches` (fractions of the run) adds shorter runs that share the
    stable phase: each leaves it at its own point and decays over the same fraction of its own
    length, so one run yields several (N, D) points."""

    SHAPES = ("linear", "sqrt", "cosine")

    def __init__(self, warmup: float = 0.05, decay_fraction: float = 0.2, min_lr_ratio: float = 0.0,
                 decay_shape: str = "linear", branches: tuple[float, ...] = ()):
        super().__init__(warmup)
        if decay_shape not in self.SHAPES:
            raise ValueError(f"schedule.decay_shape={decay_shape!r}: choose one of {', '.join(self.SHAPES)}")
        bad = [b for b in branches if not 0 < b < 1]
        if bad:
            raise ValueError(f"schedule.branches={list(branches)}: each is a fraction of the run in (0, 1); got {bad}")
        self.decay_fraction, self.min_lr_ratio, self.decay_shape = decay_fraction, min_lr_ratio, decay_shape
        self.branches = tuple(sorted(branches))

    def branch_points(self, total: int) -> list[tuple[int, int]]:
        """(step where the branch leaves the stable phase, its last step) for each branch."""
        points = []
        for fraction in self.branches:
            end = max(1, round(fraction * total))
            points.append((end - int(self.decay_fraction * end), end))
        return points

    def for_branch(self, total: int) -> "WSD":
        """The schedule of a branch: the main run's warmup (in steps), its own decay at its end."""
        return WSD(warmup=max(1, _warmup_steps(self.warmup, total)) if self.warmup else 0,
                   decay_fraction=self.decay_fraction, min_lr_ratio=self.min_lr_ratio, decay_shape=self.decay_shape)

    def __call__(self, step: int, total: int) -> float:
        w = _warmup_steps(self.warmup, total)
        if step < w:
            return (step + 1) / w
        decay_start = total - int(self.decay_fraction * total)
        if step < decay_start:
            return 1.0
        p = min(1.0, (step - decay_start) / max(1, total - decay_start))
        remaining = {"linear": 1 - p, "sqrt": 1 - math.sqrt(p), "cosine": 0.5 * (1 + math.cos(math.pi * p))}[self.decay_shape]
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * remaining
