"""LoRA: low-rank adapters on the linear layers of a `Transformer` (Hu et al., 2021).

A targeted `nn.Linear` W becomes W x + (alpha / r) B A dropout(x), with A (r x in) random and
B (out x r) zero, so the adapted model starts exactly where the base model is; only A and B
train. Usage, after the base weights are loaded and before the model is sharded:

    n_trainable = apply_lora(model, rank=8, alpha=16, targets=["q", "v"])
    ...train...
    save(lora_state_dict(model))   # the adapters (and any train_modules) only: a few kB
    merge_lora(model)              # an ordinary Transformer again, for export

The adapted layers stay `nn.Linear` instances that keep `weight` and `bias` under their names, so
base checkpoints load into an adapted model and `llm.parallel` shards it block by block as usual.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.fields import at_least, positive, unit_interval

ADAPTER_NAMES = ("lora_a", "lora_b")
ALL_LINEAR = "all-linear"  # every linear layer but the output heads (PEFT's meaning)
OUTPUT_HEADS = ("lm_head", "head")  # the language model's and the value model's (llm.model.value)


@dataclass
class LoRAConfig:
    """The `posttrain.lora` config section: whether and where to put adapters."""

    rank: int = at_least(1, 8, high=2**16)
    alpha: float = positive(16.0, high=1e4)  # the adapter's output is scaled by alpha / rank
    dropout: float = unit_interval(0.0, high_open=True)  # on the adapter's input only
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # names, suffixes, globs or "all-linear"
    enabled: bool = False
    # Modules trained in full beside the adapters, e.g. [head]: a reward model's new value head.
    train_modules: list[str] = field(default_factory=list)


class LoRALinear(nn.Linear):
    """A linear layer plus a trainable low-rank update: W x + b + (alpha / rank) B A dropout(x)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        device: Union[torch.device, str, None] = None,
        dtype: Union[torch.dtype, None] = None,
    ):
        if rank < 1:
            raise ValueError(f"lora rank={rank} must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout={dropout} must be in [0, 1)")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> LoRALinear:
        """Wrap an existing layer: the new module holds the *same* weight and bias parameters
        (no copy, so tied weights stay tied) and fresh adapters on the weight's device and dtype."""
        weight = linear.weight
        # Built on the meta device so no throw-away base weight is allocated, then given the real ones.
        lora = cls(
            linear.in_features, linear.out_features, linear.bias is not None, rank, alpha, dropout, device="meta"
        )
        lora.weight, lora.bias = weight, linear.bias
        lora.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, device=weight.device, dtype=weight.dtype))
        lora.lora_b = nn.Parameter(torch.empty(linear.out_features, rank, device=weight.device, dtype=weight.dtype))
        lora.reset_adapter()
        return lora.train(linear.training)  # an eval-mode model must not start dropping out

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lora_a"):  # nn.Linear.__init__ calls this before the adapter exists
            self.reset_adapter()

    def reset_adapter(self) -> None:
        """A as nn.Linear initialises its weight, B zero: the update B A starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def delta_weight(self) -> Tensor:
        """The update the adapter adds to the weight: (alpha / rank) B A, (out, in)."""
        return self.scaling * (self.lora_b @ self.lora_a)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)
        return super().forward(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight is W + (alpha / rank) B A (folded in place, in float32)."""
        with torch.no_grad():
            delta = self.scaling * (self.lora_b.float() @ self.lora_a.float())
            self.weight.add_(delta.to(self.weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _matches(name: str, target: str) -> bool:
    if target == ALL_LINEAR:
        return name.rsplit(".", 1)[-1] not in OUTPUT_HEADS
    if any(c in target for c in "*?["):
        return fnmatch.fnmatchcase(name, target)
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: Union[str, Sequence[str]]) -> list[str]:
    """The qualified names of the linear layers that `targets` select.

    A target is a module name or dotted suffix (`q`, `attn.q`, `lm_head`), a glob on the full
    name (`blocks.0.*`, `blocks.*.mlp.*`), or `all-linear` (every linear layer but the output
    heads `lm_head` and `head`). A target that selects nothing is an error naming the layers
    there are.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("lora targets is empty: name at least one module (e.g. [q, v] or all-linear)")
    return _select(_linear_names(model), targets, "lora target", "linear layer", f", or {ALL_LINEAR}")


def _select(names: list[str], targets: list[str], what: str, kind: str, more: str = "") -> list[str]:
    chosen = []
    for target in targets:
        hits = [name for name in names if _matches(name, target)]
        if not hits:
            short = sorted({name.rsplit(".", 1)[-1] for name in names if name})
            raise ValueError(
                f"{what} {target!r} matches no {kind}; the model's are named "
                f"{', '.join(short)} (as suffixes such as attn.q or globs such as blocks.*.mlp.*{more})"
            )
        chosen += [name for name in hits if name not in chosen]
    return [name for name in names if name in chosen]  # in model order


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Union[str, Sequence[str]] = ("q", "v"),
    train_modules: Sequence[str] = (),
) -> int:
    """Put LoRA adapters on the targeted linear layers (see `find_targets`) and freeze everything
    else but the `train_modules` (named as targets are; e.g. `head`, a value model's new head,
    which must learn in full); returns the number of trainable parameters."""
    names = find_targets(model, targets)
    if ALL_LINEAR in train_modules:
        raise ValueError(f"lora train_modules names modules to train in full, not {ALL_LINEAR}: e.g. [head]")
    modules = [name for name, _ in model.named_modules() if name]
    full = _select(modules, list(train_modules), "lora train_modules entry", "module")
    if overlap := sorted(set(names) & set(full)):
        raise ValueError(
            f"{', '.join(overlap)} cannot both get an adapter and train in full (lora targets and train_modules)"
        )
    shared = _shared_weights(model)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter: apply_lora once, or merge_lora first")
        if name in shared:
            # Folding B A into a tied weight would change the other module too (the embedding).
            raise ValueError(
                f"lora cannot target {name}: its weight is shared with {shared[name]} (tied embeddings), "
                "so the adapter could not be merged; target other layers or untie the embeddings"
            )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in full:
        model.get_submodule(name).requires_grad_(True)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear.from_linear(model.get_submodule(name), rank, alpha, dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _shared_weights(model: nn.Module) -> dict[str, str]:
    """Linear layers whose weight another module also holds: {layer: the other parameter's name}."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    shared = {}
    for name in _linear_names(model):
        holders = owners.get(id(model.get_submodule(name).weight), [])
        if len(holders) > 1:
            shared[name] = ", ".join(h for h in holders if h != f"{name}.weight")
    return shared


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers of a model, by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What LoRA training changed, under the model's state-dict keys: the adapter tensors
    (`...lora_a`, `...lora_b`) and the parameters of the fully trained `train_modules`."""
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    return {
        key: value for key, value in model.state_dict().items()
        if key.rsplit(".", 1)[-1] in ADAPTER_NAMES or key in trained
    }


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load what `lora_state_dict` saved into a model adapted the same way (targets and
    train_modules); a mismatch is an error naming the keys, not a silent partial load."""
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            "the LoRA state dict does not fit this model's adapters "
            f"(missing: {', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(unexpected[:4]) or 'none'}); "
            "apply_lora with the targets it was trained with"
        )
    model.load_state_dict(state_dict, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (alpha / rank) B A) and turn the layers back
    into plain nn.Linear modules, all parameters trainable again: an ordinary model, whose
    state dict has the base model's keys, for export and HF interop."""
    for name, module in lora_modules(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.merged())
    for param in model.parameters():
        param.requires_grad_(True)
    return model
