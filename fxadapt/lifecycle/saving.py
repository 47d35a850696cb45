"""save_adapter / load_adapter directories, in the layouts both fxadapt and the reference read by default.

    DIR/adapter_config.json + adapter.safetensors + pytorch_adapter.bin    AdapterHub layout
                                     (checkpoints/adapterhub.py); keys `<reference module>.<name>.<param>`
    DIR/head_config.json + model_head.safetensors + pytorch_model_head.bin   the adapter's flex head, if any
    DIR/peft/adapter_config.json + adapter_model.safetensors   plain LoRA adapters also in PEFT's layout

Files are written into DIR one by one, each atomically (checkpoints/writer.py): other files in DIR are left
alone, and a failed save leaves DIR as it was. `adapters` 1.3.0 reads the directory with its plain
`load_adapter(DIR)` (the `.bin`) or with `use_safetensors=True`; PEFT with `PeftModel.from_pretrained(model,
DIR/peft)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .. import __version__
from ..checkpoints import adapterhub
from ..checkpoints.writer import write_into
from ..errors import UserError
from ..methods.base import Placement
from ..sites import SiteMap
from ..spec import AdapterDef
from . import peft_layout
from .heads import ClassificationHead

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHT_FILES = ("model_head.safetensors", "pytorch_model_head.bin")
HEAD_WEIGHTS = HEAD_WEIGHT_FILES[0]
PEFT_DIR = "peft"
# Every file an adapter save may write: a later save removes the ones it does not write again.
KNOWN_FILES = (*adapterhub.KNOWN_FILES, HEAD_CONFIG, *HEAD_WEIGHT_FILES,
               f"{PEFT_DIR}/{peft_layout.CONFIG_FILE}", f"{PEFT_DIR}/{peft_layout.WEIGHTS_FILE}")


def model_facts(config: Any, model_class: str, source: str) -> dict[str, Any]:
    """The model facts AdapterHub writes beside an adapter's config."""
    return {"hidden_size": getattr(config, "hidden_size", None), "model_class": model_class,
            "model_name": getattr(config, "name_or_path", None) or source,
            "model_type": getattr(config, "model_type", None), "version": f"fxadapt.{__version__}"}


def reference_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config dict as AdapterHub writes it: bottleneck configs carry no `architecture` (its BnConfig has
    none, and `adapters` rejects an unknown one); fxadapt reads a missing architecture as bottleneck."""
    if config.get("architecture") == "bottleneck":
        return {k: v for k, v in config.items() if k != "architecture"}
    return config


def save_adapter(directory: Path, holder: nn.Module, adapter: AdapterDef, placements: list[Placement],
                 facts: dict[str, Any], sites: SiteMap, head: ClassificationHead | None = None,
                 peft: bool = True) -> list[str]:
    """Write one adapter (and its head) into `directory`; returns the layouts written."""
    layouts = ["adapterhub"]
    with write_into(Path(directory), "save_adapter", KNOWN_FILES, adapterhub.CONFIG_FILE) as out:
        config = reference_config(adapter.config.to_dict())
        adapterhub.write_checkpoint(out, adapterhub.adapter_tensors(holder, placements, adapter.name),
                                    {"config": config, "name": adapter.name, **facts})
        if head is not None:
            save_head(out, adapter.name, head, facts)
            layouts.append("head")
        # A method that PEFT can express declares `peft_layout(config)` (the LoRA family: plain, ungated LoRA).
        peft_layout_of = getattr(adapter.method, "peft_layout", None)
        if peft and placements and peft_layout_of is not None and peft_layout_of(adapter.config):
            (out / PEFT_DIR).mkdir()
            modules = {p.module_path: holder.get_submodule(p.module_path) for p in placements}
            peft_layout.write(out / PEFT_DIR, placements, modules, adapter.config, sites, facts.get("model_name"))
            layouts.append("peft")
    return layouts


def save_head(directory: Path, name: str, head: ClassificationHead, facts: dict[str, Any]) -> None:
    """`head_config.json` and the head's weights, as safetensors and as the reference's default `.bin`."""
    tensors = {f"heads.{name}.{k}": v.detach().contiguous().clone() for k, v in head.state_dict().items()}
    adapterhub.write_weights(tensors, directory, HEAD_WEIGHT_FILES)
    model_class = (facts.get("model_class") or "").removesuffix("Model") + "AdapterModel"
    data = {"config": head.config, **facts, "model_class": model_class, "name": name}
    (directory / HEAD_CONFIG).write_text(json.dumps(data, indent=2) + "\n")


def read_head(directory: Path, hidden: int, dropout: float, path: str) -> tuple[str, ClassificationHead] | None:
    """(saved name, head with its weights) of a saved flex head, or None when the directory has none."""
    config_file = directory / HEAD_CONFIG
    if not config_file.is_file():
        return None
    data = adapterhub.read_json_file(config_file, path)
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or not isinstance(data.get("name"), str):
        raise UserError(f"{path}: {config_file} needs a \"config\" object and a \"name\" string.")
    if config.get("head_type") != "classification":
        raise UserError(f"{path}: {config_file} holds a {config.get('head_type')!r} head; fxadapt loads "
                        "classification heads only.")
    weights = adapterhub.read_weights(directory, path, HEAD_WEIGHT_FILES, "the head directory ")
    prefix = f"heads.{data['name']}."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    num_labels, layers = config.get("num_labels"), config.get("layers", 2)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (num_labels, layers)):
        raise UserError(f"{path}: {config_file}: num_labels and layers must be positive integers, got "
                        f"{num_labels!r} and {layers!r}.")
    # Sizes come from an untrusted file: compare them with the saved tensors before allocating the head.
    expected = (layers - 1) * (hidden * hidden + hidden) + hidden * num_labels + num_labels
    if sum(t.numel() for t in state.values()) != expected:
        raise UserError(f"{path}: the head in {directory} does not fit this model: its config asks for "
                        f"{layers} layer(s) and {num_labels} label(s) at hidden size {hidden}, but the saved "
                        "tensors have another size.")
    try:
        head = ClassificationHead(hidden, num_labels, layers, config.get("activation_function", "tanh"),
                                  config.get("dropout_prob") if config.get("dropout_prob") is not None else dropout)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: the head config in {config_file} is invalid ({type(exc).__name__}: {exc}).") \
            from None
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: the head in {directory} does not fit this model ({str(exc).splitlines()[0]}).") \
            from None
    return data["name"], head



def saved_name(directory: Path) -> str | None:
    """The adapter name an AdapterHub directory was saved under (None for PEFT or unreadable directories)."""
    try:
        data = adapterhub.read_json_file(Path(directory) / adapterhub.CONFIG_FILE, "")
    except UserError:
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else None
