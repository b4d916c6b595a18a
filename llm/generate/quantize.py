"""Int8 weights for inference, and how much memory a model takes before and after.

`quantize_int8` is PyTorch's dynamic quantization of Linear layers: each weight is stored as int8
with one scale per output channel, and activations are quantized on the fly, batch by batch, so
nothing needs calibrating. Matmuls run in int8 on the CPU kernels (x86/fbgemm, qnnpack); there
is no CUDA kernel for these layers, so an int8 model stays on the CPU.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

# torch.ao.quantization announces its move to torchao on every call; the API still works in the
# torch we pin, and the warnings would bury our own output.
_DEPRECATION_NOISE = (".*torch.ao.quantization is deprecated.*", ".*quantize_per_(tensor|channel).*deprecated.*")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the Linear layers of `model` (a CPU model) by dynamically quantized int8 ones, in
    place; returns the model, in eval mode.

    A tied LM head is left in float: its weight IS the embedding table, which the model still
    needs in float to look tokens up, so an int8 copy would add memory instead of saving it.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantize_int8: PyTorch's dynamic int8 kernels run on the CPU only; "
                         "move the model there first")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    embed = getattr(getattr(model, "embed", None), "weight", None)
    spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not (embed is not None and module.weight is embed)}
    with warnings.catch_warnings():
        for pattern in _DEPRECATION_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        return quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=True)


def _tensor_bytes(t: Tensor) -> int:
    size = t.numel() * t.element_size()
    if t.is_quantized and t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        size += sum(x.numel() * x.element_size() for x in (t.q_per_channel_scales(), t.q_per_channel_zero_points()))
    return size


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: parameters and buffers (a tied or shared tensor once) plus
    the packed weights of quantized Linear layers (int8 values, per-channel scales and zero
    points, float bias), which are neither parameters nor buffers."""
    total = sum(_tensor_bytes(p) for p in model.parameters())  # parameters() yields a tied weight once
    total += sum(_tensor_bytes(b) for b in model.buffers())
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            total += sum(_tensor_bytes(t) for t in packed._weight_bias() if t is not None)
    return total
