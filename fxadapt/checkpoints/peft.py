"""PEFT checkpoints: `adapter_config.json` (with `peft_type`) + `adapter_model.safetensors` (or `.bin`).

Keys are `base_model.model.<module path>.<tensor>` with PEFT's adapter name removed, e.g.
`base_model.model.encoder.layer.0.attention.self.query.lora_A.weight`, `...lora_B.weight`,
`...lora_magnitude_vector` (DoRA). The adapter modules (methods/lora/peft.py) mirror those names, so
each tensor maps to `<placement.reference_module>.<state name>`. Other tensors are base-model
parameters the checkpoint overrides: biases (`bias` "all"/"lora_only", saved as `<module>.base_layer.bias`
for adapted modules) and `modules_to_save` (e.g. a classifier head); they replace the captured model's
parameters. A leading base-model prefix (`bert.`) is ignored on both sides, as for AdapterHub checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx, nn

from ..errors import UserError
from ..methods.lora import peft as peft_lora
from . import adapterhub
from .adapterhub import read_checkpoint_json

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."


def is_peft(data: dict) -> bool:
    """Whether a parsed adapter_config.json is PEFT's."""
    return "peft_type" in data


def read_config(directory: Path, path: str) -> peft_lora.Config:
    return peft_lora.Config.from_dict(read_checkpoint_json(directory, path), path)


def read_weights(directory: Path, path: str) -> dict[str, torch.Tensor]:
    return adapterhub.read_weights(directory, path, WEIGHT_FILES, "PEFT checkpoint ")


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key


def _base_parameters(gm: fx.GraphModule, base_prefix: str) -> dict[str, str]:
    """Checkpoint-style name (base prefix stripped) -> the GraphModule's attribute path, for base parameters."""
    names = {}
    for name, _ in gm.named_parameters(remove_duplicate=False):
        if not name.startswith("fxadapt."):
            names[_strip(name, base_prefix)] = name
    return names


def _override(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, leaf)
    # A new tensor, not an in-place copy: the captured model's own parameters stay untouched.
    setattr(owner, leaf, nn.Parameter(value.to(old.dtype).clone(), requires_grad=old.requires_grad))


def load_into(gm: fx.GraphModule, placements: list, directory: Path, path: str, base_prefix: str) -> int:
    """Copy a PEFT checkpoint's tensors into the adapter modules and overridden base parameters."""
    weights = {}
    for key, value in read_weights(directory, path).items():
        weights[_strip(key[len(PREFIX):] if key.startswith(PREFIX) else key, base_prefix)] = value
    used: set[str] = set()
    for placement in placements:
        module = gm.get_submodule(placement.module_path)
        prefix = _strip(placement.reference_module, base_prefix)
        for name, tensor in module.state_dict().items():
            key = f"{prefix}.{name}"
            if key not in weights:
                raise UserError(f"{path}: PEFT checkpoint {directory} lacks {PREFIX + key!r} (needed for "
                                f"{placement.reference_module}); it was saved for another model or config.")
            value = weights[key]
            if value.shape != tensor.shape:
                raise UserError(f"{path}: {PREFIX + key!r} in {directory} has shape {tuple(value.shape)}, but this "
                                f"model needs {tuple(tensor.shape)}; the checkpoint belongs to another model size.")
            tensor.copy_(value)
            used.add(key)
    base = _base_parameters(gm, base_prefix)
    overridden = []
    for key in sorted(set(weights) - used):
        name = key.replace(".base_layer.", ".")
        if name not in base:
            raise UserError(f"{path}: PEFT checkpoint {directory} has {PREFIX + key!r}, which this model has no place "
                            "for; it was saved for another architecture, or targets modules fxadapt does not adapt "
                            "(embeddings, convolutions).")
        current = gm.get_parameter(base[name])
        if current.shape != weights[key].shape:
            raise UserError(f"{path}: {PREFIX + key!r} in {directory} has shape {tuple(weights[key].shape)}, but the "
                            f"model's {base[name]} is {tuple(current.shape)}.")
        _override(gm, base[name], weights[key])
        overridden.append(base[name])
    if overridden:
        gm.meta.setdefault("fxadapt", {}).setdefault("overridden", []).extend(overridden)
    return len(used) + len(overridden)
