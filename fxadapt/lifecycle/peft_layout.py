"""PEFT's on-disk layout for LoRA adapters: `adapter_config.json` (peft_type LORA) + `adapter_model.safetensors`.

Keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` for every adapted projection
`<module>` (the Hugging Face module path, as PEFT's `get_peft_model_state_dict` writes them), and
PEFT computes the same update, h' = W x + b + (lora_alpha / r) · B A x.

A fused q/k/v projection with per-matrix LoRAs (GPT-2's c_attn, the reference's LoRAMergedLinear)
becomes one rank-(e·r) PEFT LoRA: A' stacks the e enabled A's, B' puts each B in its chunk's rows and
column block (zeros elsewhere), and lora_alpha' = e·alpha keeps the scaling alpha / r
(`rank_pattern`/`alpha_pattern` carry the per-module values). Reading PEFT directories is the job of
checkpoints/peft.py (the `peft_lora` method), which load_adapter uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..methods.base import Placement
from ..sites import SiteMap

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _module_of(placement: Placement) -> str:
    return placement.reference_module.removesuffix(".loras")


def _factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of one LoRA module in PEFT's unfused form."""
    a, b = module.lora_A.detach(), module.lora_B.detach()
    if not module.chunks:
        return a.clone(), b.clone()
    r, size = module.r, module.chunk_size
    wide = b.new_zeros(size * len(module.chunks), a.shape[0])
    index = 0
    for chunk, enabled in enumerate(module.chunks):
        if enabled:
            wide[chunk * size:(chunk + 1) * size, index * r:(index + 1) * r] = b[index * size:(index + 1) * size]
            index += 1
    return a.clone(), wide


def write(directory: Path, placements: list[Placement], modules: dict[str, nn.Module], config: Any,
          sites: SiteMap, base_model: str | None) -> None:
    """Write the PEFT layout of one LoRA adapter into `directory` (which must exist)."""
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    targets: list[str] = []
    addmm = {site.module for site in sites.linears if site.layout == "addmm"}
    for placement in placements:
        module_path = _module_of(placement)
        a, b = _factors(modules[placement.module_path])
        tensors[f"{_PREFIX}{module_path}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{module_path}.lora_B.weight"] = b.contiguous()
        targets.append(module_path)
        if a.shape[0] != config.r:
            rank_pattern[module_path] = a.shape[0]
            alpha_pattern[module_path] = config.alpha * (a.shape[0] // config.r)
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "inference_mode": True,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": sorted(targets),
        "fan_in_fan_out": any(t in addmm for t in targets), "bias": "none", "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    }
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")

