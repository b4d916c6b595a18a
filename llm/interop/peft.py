"""A LoRA run's adapters as a PEFT folder: `adapter_config.json` + `adapter_model.safetensors`.

`peft.PeftModel.from_pretrained(base, folder)` puts them on the exported parent (the base the
run trained its adapters on) and computes what the merged model computes: our adapter is PEFT's
LoRA exactly (W x + (alpha / r) B A x; A is PEFT's `lora_A`, B its `lora_B`; no rsLoRA, no DoRA),
so the folder is a renaming of tensors, written without importing peft. Llama family only: GPT-2
fuses q, k and v into one `c_attn` layer, on which per-projection adapters have no PEFT form.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Optional

from llm.checkpoint.meta import CheckpointMeta
from llm.files import write_json
from llm.model.lora import LoRAConfig

ADAPTER_DIR = "adapter"  # inside the exported folder, so AutoModel does not mistake the folder for an adapter
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the transformers model as base_model.model


def adapter_config(lora: LoRAConfig, targets: list[str], base: Optional[str]) -> dict:
    """PEFT's LoraConfig as adapter_config.json holds it."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,  # full module names: PEFT matches them exactly (as suffixes)
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base,
    }


def export_adapter(checkpoint: Path, meta: CheckpointMeta, family: ModuleType, out: Path) -> Path:
    """Write the adapters of `checkpoint` (a LoRA run's adapters-only last.ckpt, whose `meta`
    says how they were made) as a PEFT folder `out`; ValueError naming what PEFT cannot hold."""
    from safetensors.torch import save_file

    from llm.checkpoint.load import read_weights

    lora = meta.lora
    assert lora is not None
    if not hasattr(family, "module_name"):
        raise ValueError(f"PEFT adapters of the {family.MODEL_TYPE} family: its q, k and v are one fused layer, on "
                         "which per-projection adapters have no PEFT form (the merged model is exported)")
    if lora.train_modules:
        raise ValueError(f"PEFT adapters: posttrain.lora.train_modules={lora.train_modules} trained whole modules "
                         "beside the adapters (the merged model is exported)")
    weights = read_weights(checkpoint)
    tensors, targets = {}, []
    for key in sorted(k for k in weights if k.endswith(".lora_a")):
        ours = key.removesuffix(".lora_a")
        theirs = family.module_name(ours)
        targets.append(theirs)
        tensors[f"{PEFT_PREFIX}{theirs}.lora_A.weight"] = weights[key].contiguous()
        tensors[f"{PEFT_PREFIX}{theirs}.lora_B.weight"] = weights[f"{ours}.lora_b"].contiguous()
    if not targets:
        raise ValueError(f"{checkpoint}: no LoRA adapters in it")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(out / "adapter_config.json", adapter_config(lora, targets, str(meta.parent) if meta.parent else None))
    return out


def lora_checkpoint(path: Path, run_dir: Optional[Path]) -> Optional[tuple[Path, CheckpointMeta]]:
    """The adapters-only checkpoint behind an export source: the checkpoint itself, or (for a
    finished LoRA run, whose run directory stands for its merged.ckpt) the run's last.ckpt."""
    from llm.checkpoint.find import last_checkpoint

    candidates = [path] + ([last] if run_dir is not None and (last := last_checkpoint(run_dir)) else [])
    for candidate in candidates:
        meta = CheckpointMeta.read(candidate, "source")
        if meta.lora is not None:
            return candidate, meta
    return None
