"""AdapterHub checkpoints: `adapter_config.json` + `adapter.safetensors` or `pytorch_adapter.bin`.

Keys are the reference model's parameter names, e.g. `encoder.layer.0.output.adapters.NAME.adapter_up.weight`;
each insertion records the reference module of its site, so the mapping is one-to-one. A leading
base-model prefix (`bert.`) is ignored on both sides, so a checkpoint saved from a model with a head
loads into the bare encoder and vice versa. `.bin` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import fx

from ..errors import UserError
from .writer import write_into

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")
KNOWN_FILES = (CONFIG_FILE, *WEIGHT_FILES)


def read_config(directory: Path, path: str) -> dict[str, Any]:
    """The method config dict stored in an AdapterHub checkpoint directory (with checkpoint facts under `_`)."""
    data = read_checkpoint_json(directory, path)
    if "peft_type" in data:
        raise UserError(f"{path}: {directory} is a PEFT checkpoint; PEFT checkpoints are not supported by "
                        "fxadapt yet (AdapterHub checkpoints are).")
    config = data.get("config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: {directory / CONFIG_FILE} has no \"config\" object; is it an AdapterHub "
                        "adapter directory (written by save_adapter)?")
    return dict(config)


def read_checkpoint_json(directory: Path, path: str, config_file: str = CONFIG_FILE,
                         expected: str = "an AdapterHub adapter directory") -> dict[str, Any]:
    """The JSON object in `directory/config_file`; a missing or corrupt file is a UserError naming `path`."""
    file = directory / config_file
    if not directory.is_dir():
        raise UserError(f"{path}: checkpoint directory {directory} does not exist.")
    if not file.is_file():
        raise UserError(f"{path}: {directory} has no {config_file}; expected {expected}.")
    data = read_json_file(file, path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: {file} must hold a JSON object.")
    return data


def read_json_file(file: Path, path: str) -> Any:
    """A JSON file from an untrusted checkpoint: every way it can be unreadable is a UserError naming it."""
    try:
        return json.loads(file.read_bytes().decode("utf-8"), parse_constant=refuse_constant(f"{path}: {file}"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: {file} is corrupt (line {exc.lineno}: {exc.msg}).") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: {file} is not UTF-8 text; JSON files must be UTF-8.") from None
    except RecursionError:
        raise UserError(f"{path}: {file} is nested too deeply to be an adapter config.") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise UserError(f"{path}: {file} holds a value that cannot be read ({exc}).") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {file} ({exc.strerror or exc}).") from None


def refuse_constant(where: str):
    """A json `parse_constant` hook: NaN and Infinity are not JSON, and as a config value (alpha, scaling) they
    would only show up later as outputs that differ."""
    def refuse(token: str):
        raise UserError(f"{where} holds {token}, which is not a JSON number; write a finite value.")
    return refuse


def read_weights(directory: Path, path: str, files: tuple[str, ...] = WEIGHT_FILES,
                 kind: str = "") -> dict[str, torch.Tensor]:
    """The first weight file of `files` found in `directory` (`.bin` through weights_only torch.load)."""
    for name in files:
        file = directory / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                weights = load_file(str(file))
            else:
                weights = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt files raise many types (pickle, safetensors, zip)
            raise UserError(f"{path}: cannot read {file}: it is corrupt or not a weight file "
                            f"({type(exc).__name__}).") from None
        return checked_tensors(weights, file, path)
    raise UserError(f"{path}: {kind}{directory} has no weights file ({' or '.join(files)}).")


def checked_tensors(weights: Any, file: Path, path: str) -> dict[str, torch.Tensor]:
    """`weights` if it is a dict of finite tensors: a NaN or Inf weight would only show up later as outputs
    that differ, so it is refused at load, naming the tensor."""
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise UserError(f"{path}: {file} does not hold a mapping of names to tensors.")
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: tensor {key!r} in {file} holds NaN or Inf values; the checkpoint is "
                            "damaged or was saved from a diverged training run.")
    return weights


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key


def load_into(gm: fx.GraphModule, placements: list, directory: Path, path: str, base_prefix: str,
              model_hidden: int | None) -> int:
    """Copy a checkpoint's tensors into the adapter modules of `placements`; returns tensors loaded."""
    info = read_checkpoint_json(directory, path)
    saved_name = info.get("name")
    hidden = info.get("hidden_size")
    if model_hidden is not None and isinstance(hidden, int) and hidden != model_hidden:
        raise UserError(f"{path}: the checkpoint in {directory} was trained for hidden size {hidden}, but this "
                        f"model's hidden size is {model_hidden}; use an adapter trained for this model.")
    weights = {_strip(k, base_prefix): v for k, v in read_weights(directory, path).items()}
    used: set[str] = set()
    for placement in placements:
        module = gm.get_submodule(placement.module_path)
        prefix = _strip(placement.reference_module, base_prefix) + f".{saved_name or placement.adapter}."
        if hasattr(module, "match_checkpoint"):  # e.g. a prefix pool takes the checkpoint's location name
            module.match_checkpoint(weights, prefix)
        for name, tensor in module.state_dict().items():
            key = prefix + name
            if key not in weights and placement.reference_module == "shared_parameters":
                # adapters <= 1.3.0 drops shared Compacter tensors when saving from a bare base model.
                raise UserError(f"{path}: checkpoint {directory} lacks the shared tensor {key!r}; adapters 1.3.0 "
                                "does not save a Compacter's shared parameters from a model without a head, so "
                                "this checkpoint cannot reproduce its adapter. Re-save it from a model with a head, "
                                "or add the tensor under that key.")
            if key not in weights:
                raise UserError(f"{path}: checkpoint {directory} lacks {key!r} (needed for the adapter at "
                                f"{placement.role}, layer {placement.layer}); it was saved for another model or "
                                "config.")
            value = weights[key]
            if value.shape != tensor.shape:
                raise UserError(f"{path}: {key!r} in {directory} has shape {tuple(value.shape)}, but this model "
                                f"needs {tuple(tensor.shape)}; the checkpoint belongs to another model size.")
            tensor.copy_(value)
            used.add(key)
    unused = sorted(set(weights) - used)
    if unused:
        raise UserError(f"{path}: checkpoint {directory} has {len(unused)} tensor(s) this model has no place for, "
                        f"e.g. {unused[0]!r}; it was saved for another architecture or layer count.")
    return len(used)


def save(gm: fx.GraphModule, placements: list, directory: Path, name: str, config: dict[str, Any],
         extra: dict[str, Any]) -> None:
    """Write an AdapterHub checkpoint into `directory` (see `write_checkpoint`); each file replaces its
    namesake atomically, other files in `directory` stay."""
    with write_into(directory, f"save({str(directory)!r})", KNOWN_FILES, CONFIG_FILE) as out:
        write_checkpoint(out, adapter_tensors(gm, placements, name), {"config": config, "name": name, **extra})


def adapter_tensors(gm: fx.GraphModule, placements: list, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the reference's keys, `<reference module>.<name>.<parameter>`."""
    tensors = {}
    for placement in placements:
        module = gm.get_submodule(placement.module_path)
        for key, tensor in module.state_dict().items():
            tensors[f"{placement.reference_module}.{name}.{key}"] = tensor.detach().contiguous().clone()
    return tensors


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    """`adapter.safetensors`, `pytorch_adapter.bin` (what the reference's default `load_adapter(DIR)` reads)
    and `adapter_config.json` in `directory`."""
    write_weights(tensors, directory, WEIGHT_FILES)
    (directory / CONFIG_FILE).write_text(json.dumps(data, indent=2))


def write_weights(tensors: dict[str, torch.Tensor], directory: Path, files: tuple[str, str]) -> None:
    """The same tensors as safetensors (`files[0]`) and as a plain `torch.save` dict (`files[1]`), which both
    fxadapt and the reference read with weights_only loading."""
    save_file(tensors, str(directory / files[0]))
    torch.save(tensors, directory / files[1])
