"""AdapterFusion definitions of the spec's `"fusions"`: which adapters a fusion attends over and its
AdapterFusionConfig, given inline or loaded from a saved AdapterHub fusion directory.

    {"adapters": ["a", "b"], "config": "dynamic" | "static", <AdapterFusionConfig field>: value, ...}
    {"adapters": ["a", "b"], "load": DIR}   a saved fusion (save_adapter_fusion: adapter_fusion_config.json +
                                            pytorch_model_adapter_fusion.bin); "adapters" must be the names
                                            it was saved over, in that order (its "adapter_names")
    {"load": DIR}                           the same, the adapters taken from the checkpoint

The fusion's name is the reference's: the adapter names joined by ",".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import adapterhub
from ..errors import UserError

CONFIG_FILE = "adapter_fusion_config.json"
# Placement.method of an AdapterFusion module (fusion is no method: a Fuse block's modules at composed sites).
FUSION_METHOD = "fusion"
WEIGHT_FILES = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
# AdapterHub's DynamicAdapterFusionConfig / StaticAdapterFusionConfig.
PRESETS: dict[str, dict[str, Any]] = {
    "dynamic": dict(key=True, query=True, value=True, query_before_ln=False, regularization=True,
                    residual_before=False, temperature=False, value_before_softmax=True, value_initialized=True,
                    dropout_prob=None),
    "static": dict(key=True, query=True, value=False, query_before_ln=False, regularization=False,
                   residual_before=False, temperature=False, value_before_softmax=True, value_initialized=False,
                   dropout_prob=None),
}


@dataclass
class FusionDef:
    name: str
    adapters: list[str]
    config: dict[str, Any]
    path: str
    load: Path | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"adapters": self.adapters, **self.config}
        if self.load is not None:
            data["load"] = str(self.load)
        return data


def parse_fusions(value: Any, adapters: dict, base_dir: Path) -> list[FusionDef]:
    if not isinstance(value, list):
        raise UserError("$.fusions: expected a list of fusion definitions such as {\"adapters\": [\"a\", \"b\"]} "
                        "or {\"load\": DIR}.")
    return [_fusion(item, adapters, f"$.fusions[{i}]", base_dir) for i, item in enumerate(value)]


def _fusion(item: Any, adapters: dict, path: str, base_dir: Path) -> FusionDef:
    if not isinstance(item, dict):
        raise UserError(f"{path}: expected an object with \"adapters\" or \"load\".")
    load = None
    if "load" in item:
        extra = sorted(set(item) - {"load", "adapters"})
        if extra:
            raise UserError(f"{path}: a loaded fusion takes only \"load\" and \"adapters\" (its config is the "
                            f"checkpoint's), got {extra}.")
        if not isinstance(item["load"], str) or not item["load"]:
            raise UserError(f"{path}.load: expected a fusion checkpoint directory path (a string).")
        load = (base_dir / item["load"]).resolve()
        data = _read_json(load, f"{path}.load")
        names, values = _saved_names(data), data.get("config")
        if not isinstance(values, dict):
            raise UserError(f"{path}.load: {load / CONFIG_FILE} has no \"config\" object.")
        if "adapters" in item:
            _check_names(item["adapters"], adapters, f"{path}.adapters")
            if names is not None and list(item["adapters"]) != names:
                order = " (the same adapters in another order: the order names the fusion and orders its " \
                        "attention)" if sorted(item["adapters"]) == sorted(names) else ""
                raise UserError(f"{path}.adapters: {item['adapters']} disagrees with the checkpoint {load}, which "
                                f"fuses {names} ({CONFIG_FILE} \"adapter_names\"){order}; list the adapters it was "
                                "saved over, in that order, or drop \"adapters\" to take them from the checkpoint.")
            names = list(item["adapters"])
    else:
        names = item.get("adapters")
        values = {k: v for k, v in item.items() if k not in ("adapters", "config")}
        preset = item.get("config", "dynamic")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise UserError(f"{path}.config: unknown fusion config {preset!r}; use \"dynamic\" or \"static\".")
        values = {**PRESETS[preset], **values}
    where = f"{path}.load" if load is not None and "adapters" not in item else f"{path}.adapters"
    _check_names(names, adapters, where)
    unknown = sorted(set(values) - set(PRESETS["dynamic"]))
    if unknown:
        raise UserError(f"{path}: unknown AdapterFusionConfig key(s) {unknown}; valid: "
                        f"{', '.join(PRESETS['dynamic'])}.")
    values = {**PRESETS["dynamic"], **values}
    _check_types(values, path)
    if values["temperature"]:
        raise UserError(f"{path}.temperature: the reference anneals the softmax temperature on every forward call "
                        "(its outputs depend on how often it ran), which a compiled graph cannot reproduce; set it "
                        "to false.")
    return FusionDef(",".join(names), list(names), values, path, load)


def _check_types(values: dict[str, Any], path: str) -> None:
    """The reference's AdapterFusionConfig types: switches are booleans (value_initialized may also be the
    reference's string form), dropout_prob is null or a probability."""
    for key, value in values.items():
        if key == "dropout_prob":
            ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1)
            expected = "null or a number in [0, 1)"
        else:
            ok = isinstance(value, bool) or (key == "value_initialized" and isinstance(value, str))
            expected = "true or false"
        if not ok:
            raise UserError(f"{path}.{key}: expected {expected}, got {json.dumps(value)[:60]}.")


def _saved_names(data: dict[str, Any]) -> list[str] | None:
    """The adapters a saved fusion is over: its "adapter_names", else its default name "a,b" split."""
    names = data.get("adapter_names")
    if names is None and isinstance(data.get("name"), str):
        names = data["name"].split(",")
    return names


def _check_names(names: Any, adapters: dict, path: str) -> None:
    """`names` is a non-empty list of the spec's adapter names."""
    if not isinstance(names, list) or len(names) < 1 or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: expected the list of fused adapter names, e.g. [\"a\", \"b\"].")
    for name in names:
        if name not in adapters:
            what = "the checkpoint fuses" if path.endswith(".load") else "unknown adapter"
            raise UserError(f"{path}: {what} {name!r}, which the spec's \"adapters\" do not define; defined "
                            f"adapters: {', '.join(adapters)}.")


def _read_json(directory: Path, path: str) -> dict[str, Any]:
    return adapterhub.read_checkpoint_json(directory, path, CONFIG_FILE, "a directory written by save_adapter_fusion")


def read_weights(directory: Path, path: str) -> dict[str, torch.Tensor]:
    return adapterhub.read_weights(directory, path, WEIGHT_FILES, "AdapterFusion directory ")


@torch.no_grad()
def load_weights(sites: list[tuple[str, nn.Module]], directory: Path, saved_name: str, base_prefix: str,
                 path: str) -> None:
    """Copy a saved fusion into its modules, one per site given as (reference module path, module): keys
    `<reference module>.<saved_name>.<param>` (the base model prefix optional, as AdapterHub saves them).
    A missing, misshapen or unplaced fusion tensor is a UserError naming the key."""
    weights = {adapterhub._strip(k, base_prefix): v for k, v in read_weights(directory, path).items()}
    used: set[str] = set()
    for reference_module, module in sites:
        prefix = adapterhub._strip(reference_module, base_prefix) + f".{saved_name}."
        for key, tensor in module.state_dict().items():
            value = weights.get(prefix + key)
            if value is None:
                raise UserError(f"{path}: {directory} lacks {prefix + key!r}; it was saved for another model or "
                                "fusion config.")
            if value.shape != tensor.shape:
                raise UserError(f"{path}: {prefix + key!r} has shape {tuple(value.shape)} in {directory}, this "
                                f"model needs {tuple(tensor.shape)}.")
            tensor.copy_(value)
            used.add(prefix + key)
    unused = sorted(k for k in set(weights) - used if ".adapter_fusion_layer." in k)
    if unused:
        raise UserError(f"{path}: {directory} has tensors this model has no place for, e.g. {unused[0]!r}.")
