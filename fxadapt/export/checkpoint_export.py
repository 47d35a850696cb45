"""`fxadapt adapters export`: a saved AdapterHub or PEFT checkpoint as an adapter file for an existing swappable
model, from its OUT/adapters/layout.json alone (no model is loaded or rebuilt).

The checkpoint takes the place of a compiled adapter of the same method: it fills that adapter's slot, whose
tensors it matches one by one (checkpoint key `<module>.<saved name>.<key>` in AdapterHub's layout,
`base_model.model.<module>.<key>` in PEFT's; the base model prefix optional on both sides, as the loaders do).
A shared (padded) slot takes a checkpoint of its config at any rank / bottleneck size up to the slot's, on all
or some of its sites: zero-padded, its scaling folded into B / up, the identity on sites it lacks (export/
slots.py); a slot of its own takes the same shapes only. Every other slot's tensors get their identity values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import adapterhub
from ..checkpoints import peft as peft_checkpoint
from ..checkpoints.loading import read_config
from ..errors import UserError
from ..methods.slot_rule import rule_of
from ..spec import load_spec
from .adapter_files import ADAPTERS_DIR, LAYOUT_FILE, Layout, read_layout, write_adapter_file
from .slots import differences, folded, pad


def convert_checkpoint(directory: Path, layout: Layout, slot: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """An AdapterHub or PEFT checkpoint as the values of an adapter file for `layout`, without the model: its
    tensors take the place of a compiled adapter of the same method and shapes (`slot`, or the first that fits;
    one with an equal config first), every other adapter's tensors their identity. Returns (slot, values)."""
    path = f"adapters export {directory}"
    method, config = read_config(directory, path)
    peft = rule_of(method).checkpoint == "peft"  # PEFT's file names and keys, else AdapterHub's
    weights = (peft_checkpoint.read_weights if peft else adapterhub.read_weights)(directory, path)
    saved = None if peft else adapterhub.read_checkpoint_json(directory, path).get("name")
    candidates = [n for n, a in layout.adapters.items() if a.get("method") == method.NAME and slot in (None, n)]
    candidates.sort(key=lambda n: layout.adapters[n].get("config") != config.to_dict())
    if not candidates:
        choices = ", ".join(f"{n} ({a.get('method')})" for n, a in layout.adapters.items())
        raise UserError(f"{path}: the model has no {'adapter ' + repr(slot) + ' of method ' if slot else ''}"
                        f"{method.NAME} adapter to take this checkpoint's place (its adapters: {choices}); compile it "
                        "with an adapter of this method and size in the spec.")
    reasons, tried = [], set()
    for name in candidates:
        slot = layout.slot_of(name)
        if slot in tried:
            continue
        tried.add(slot)
        info = layout.slots.get(slot, {})
        shared = bool(info.get("shared"))
        differ = differences(method, config.to_dict(), info["config"]) if shared else []
        if differ:
            reasons.append(f"{name}: the checkpoint's config differs from its slot's in {', '.join(differ)} (a slot "
                           "takes other ranks, sizes, scalings and sites only)")
            continue
        mapped = _map_weights(weights, layout, slot, saved or name, peft, (method, config) if shared else None)
        if isinstance(mapped, str):
            reasons.append(f"{name}: {mapped}")
            continue
        values = {t.name: mapped.get(t.name, t.identity_value()) if t.adapter == slot else t.identity_value()
                  for t in layout.tensors}
        return name, values
    raise UserError(f"{path}: the checkpoint fits no adapter of the model ({'; '.join(reasons)}); it was trained "
                    "with another config or for another model. Compile the model with an adapter of this config "
                    "and at least this rank / bottleneck size in the spec.")


def _map_weights(weights: dict[str, torch.Tensor], layout: Layout, slot: str, saved: str, peft: bool,
                 padded: tuple[Any, Any] | None) -> dict[str, np.ndarray] | str:
    """The checkpoint's tensors under the layout's names for `slot`, or why they do not fit. `padded`: (method,
    config) for a shared slot, whose tensors may be larger (zero-padded, scaling folded) or absent (identity)."""
    prefix = layout.base_prefix

    def strip(key: str) -> str:
        key = key[len(peft_checkpoint.PREFIX):] if peft and key.startswith(peft_checkpoint.PREFIX) else key
        return key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key

    stripped = {strip(k): v for k, v in weights.items()}
    mapped, used = {}, set()
    for tensor in layout.tensors:
        if tensor.adapter != slot:
            continue
        derived = rule_of(padded[0]).derived(padded[1], tensor.key, tensor.shape) if padded is not None else None
        if derived is not None:  # not a checkpoint tensor (a prefix slot's mask): from the config
            mapped[tensor.name] = np.asarray(derived, dtype=tensor.dtype)
            continue
        key = strip(f"{tensor.module}.{tensor.key}" if peft else f"{tensor.module}.{saved}.{tensor.key}")
        value = stripped.get(key)
        if value is None:
            if padded is not None:  # a site of the slot the checkpoint does not adapt: the identity there
                continue
            return f"lacks {key!r}"
        array = np.ascontiguousarray(value.to(getattr(torch, tensor.dtype)).numpy())
        if padded is not None:
            fitted = pad(array, tensor.shape, tensor.blocks)
            if fitted is None:
                return (f"{key!r} is {list(value.shape)}, larger than the model's slot {list(tensor.shape)} (a higher "
                        "rank or bottleneck size than the model was compiled for)")
            method, config = padded
            array = folded(method, config, tensor.module, tensor.key, fitted)
        elif tuple(value.shape) != tensor.shape:
            return f"{key!r} is {list(value.shape)}, the model's is {list(tensor.shape)}"
        mapped[tensor.name] = array
        used.add(key)
    unused = sorted(k for k in set(stripped) - used if not _copy_of_used(k, stripped, used, saved))
    if unused:
        return f"{len(unused)} tensor(s) the model has no place for, e.g. {unused[0]!r}"
    if not used:
        return "none of its tensors is at the slot's sites"
    return mapped


def _copy_of_used(key: str, weights: dict[str, torch.Tensor], used: set[str], saved: str) -> bool:
    """Whether `key` repeats a used tensor under another module: the reference saves a module several places
    share (a prefix pool) once per place, with equal values."""
    tail = key.split(f".{saved}.", 1)[-1]
    return any(k.split(f".{saved}.", 1)[-1] == tail and torch.equal(weights[k], weights[key]) for k in used)


def export_adapter_file(source: Path, output: Path, model_dir: Path | None = None, slot: str | None = None) -> str:
    """`fxadapt adapters export`: the checkpoint in `source` (a directory, or a spec whose active adapter loads
    one) as `output`, an adapter file for the swappable model in `model_dir` (default: the OUT whose adapters/
    folder `output` is in). Returns the compiled adapter whose place it takes."""
    if model_dir is None:
        if not (output.parent / LAYOUT_FILE).is_file():
            raise UserError(f"adapters export: say which swappable model {output} is for (--model-dir OUT), or "
                            f"write it into OUT/{ADAPTERS_DIR}/.")
        model_dir = output.parent.parent
    layout = read_layout(model_dir)
    directory = source
    if source.is_file():  # a spec: its active adapter's checkpoint
        spec = load_spec(source)
        adapter = spec.adapters[spec.active[0]] if len(spec.active) == 1 else None
        if adapter is None or adapter.load is None:
            raise UserError(f"adapters export {source}: the spec's \"active\" must be one adapter with {{\"load\": "
                            "DIR}} (a checkpoint to convert); or pass the checkpoint directory itself.")
        directory = adapter.load
    elif not source.is_dir():
        raise UserError(f"adapters export: {source} is neither a checkpoint directory nor a spec file.")
    name, values = convert_checkpoint(directory, layout, slot)
    write_adapter_file(output, layout, values)
    return name
