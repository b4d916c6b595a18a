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
    decay_fraction of the run, so one run's stable phase can be branched into several lengths."""

    SHAPES = ("linear", "sqrt", "cosine")

    def __init__(self, warmup: float = 0.05, decay_fraction: float = 0.2, min_lr_ratio: float = 0.0, decay_shape: str = "linear"):
        super().__init__(warmup)
        if decay_shape not in self.SHAPES:
            raise ValueError(f"schedule.decay_shape={decay_shape!r}: choose one of {', '.join(self.SHAPES)}")
        self.decay_fraction, self.min_lr_ratio, self.decay_shape = decay_fraction, min_lr_ratio, decay_shape

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
