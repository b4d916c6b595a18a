"""Where a training step's time goes, split into what two implementations of the same model share
and what is each model's own: the ceiling on how much faster one can be than the other.

Two models computing the same function run the same matmuls (the same GEMM library calls), the
same attention kernel, the loop's cross-entropy and the optimizer. Only the rest (norms, RoPE,
activations, residual adds, layout copies, autograd's own work) is each model's to make cheaper.
So if transformers' step takes T and our shared part takes S, ours can be at most T / S times
faster, however cheap the rest becomes: `bound` below.

    splits = step_splits({"ours": step, "hf": other})   # {side: {category: ms per step}}
"""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile

OPTIMIZER = "optimizer"  # the record_function label the benchmark's step puts around the AdamW step

# Category -> substrings of profiler op names whose self time belongs to it (first match wins).
# The optimizer is timed as a whole through its record_function label instead.
SHARED_OPS: dict[str, tuple[str, ...]] = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention kernel": ("scaled_dot_product_flash_attention", "scaled_dot_product_efficient_attention",
                         "_scaled_dot_product_cudnn_attention", "flash_attention"),
    "loss": ("log_softmax", "nll_loss", "cross_entropy"),
}
CATEGORIES = (*SHARED_OPS, OPTIMIZER, "model's other ops")


def category(op: str) -> str:
    """The SHARED_OPS category of a profiler op name, or the model's own ops."""
    for name, parts in SHARED_OPS.items():
        if any(part in op for part in parts):
            return name
    return "model's other ops"


def step_splits(steps: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, dict[str, float]]:
    """{name: milliseconds per step in each of CATEGORIES, and `total`} for each step function:
    CPU self time, mean of `repeats` profiled steps, the sides taking turns step by step so a
    shared machine's load falls on both alike (profiling adds a few percent to every op). The
    optimizer's ops count once, under OPTIMIZER, not in the categories of their op names."""
    ms = {name: dict.fromkeys(CATEGORIES, 0.0) for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            _add(ms[name], prof.events())
    splits = {}
    for name, totals in ms.items():
        splits[name] = {category_: value / repeats for category_, value in totals.items()}
        splits[name]["total"] = sum(splits[name].values())
    return splits


def _add(ms: dict[str, float], events) -> None:
    optimizer_ids = set()
    for event in events:
        if event.name == OPTIMIZER:
            ms[OPTIMIZER] += event.cpu_time_total / 1e3
            optimizer_ids.update(id(child) for child in _descendants(event))
    for event in events:
        if event.name != OPTIMIZER and id(event) not in optimizer_ids:
            ms[category(event.name)] += event.self_cpu_time_total / 1e3


def _descendants(event) -> list:
    out, stack = [], list(event.cpu_children)
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(child.cpu_children)
    return out


def shared_ms(split: dict[str, float]) -> float:
    """The part of a step that another implementation of the same model runs too."""
    return split["total"] - split["model's other ops"]


def bound(ours: dict[str, float], theirs: dict[str, float]) -> float:
    """The most ours / theirs tokens/s could reach if every op of our own cost nothing."""
    return theirs["total"] / shared_ms(ours)
