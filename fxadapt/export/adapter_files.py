"""`.onnx_adapter` files for a swappable model, and the layout that says which files fit it.

    OUT/model.onnx                   adapter tensors are graph inputs with defaults (the spec's active adapter)
    OUT/adapters/layout.json         the layout: every adapter tensor's name, shape, dtype (+ where it came from)
    OUT/adapters/<name>.onnx_adapter one file per adapter (onnxruntime.AdapterFormat), filling every input

A file's model version is the layout id (a 28-bit number from the layout digest), so a file written for
another model or another set of adapters is recognised before it is used. ONNX Runtime alone checks only
shapes against the graph's inputs (a wrong hidden size fails there; a file with fewer tensors is silently
completed from the defaults), so `read_adapter_file` checks names, shapes, dtypes and the layout id itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

LAYOUT_FILE = "layout.json"
ADAPTERS_DIR = "adapters"
SUFFIX = ".onnx_adapter"
FORMAT = "fxadapt-swappable/1"
ADAPTER_VERSION = 1  # onnxruntime.AdapterFormat's adapter version: the version of fxadapt's file contents


@dataclass(frozen=True)
class Tensor:
    """One adapter tensor of the model: an ONNX graph input. `adapter`/`module`/`key` say where it came from
    (the checkpoint key is `<module>.<adapter>.<key>` in AdapterHub's layout, `<module>.<key>` in PEFT's)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    adapter: str = ""
    module: str = ""
    key: str = ""
    identity: float = 0.0  # the value every element takes in the files of other adapters
    # where the identity is not one value (a DoRA magnitude: the base projection's row norms), all of them
    identity_values: tuple[float, ...] = ()
    blocks: int = 1  # a padded slot's dimension 0 holds this many blocks, each padded (a fused q/k/v LoRA's A)

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "adapter": self.adapter,
                "module": self.module, "key": self.key, "identity": self.identity}
        if self.identity_values:
            data["identity_values"] = list(self.identity_values)
        if self.blocks != 1:
            data["blocks"] = self.blocks
        return data

    def identity_value(self) -> np.ndarray:
        if self.identity_values:
            return np.asarray(self.identity_values, dtype=self.dtype).reshape(self.shape)
        return np.full(self.shape, self.identity, dtype=self.dtype)


@dataclass
class Layout:
    """The adapter inputs of one swappable model and the adapters compiled into it."""

    tensors: list[Tensor]
    model_class: str = ""
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"method", "format", "config", "slot"}
    active: str = ""
    base_prefix: str = ""
    # slot name -> {"method", "config", "shared"}: the tensors a file fills (Tensor.adapter names the slot;
    # a shared slot is padded, export/slots.py)
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)

    def slot_of(self, adapter: str) -> str:
        return str(self.adapters.get(adapter, {}).get("slot", adapter))

    @property
    def digest(self) -> str:
        """sha256 over the model class and every tensor's name, shape and dtype, in order."""
        text = json.dumps([self.model_class] + [[t.name, list(t.shape), t.dtype] for t in self.tensors])
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def model_version(self) -> int:
        # AdapterFormat stores the model version as a 32-bit integer: 28 bits of the digest identify the layout
        # (names, shapes and dtypes are checked one by one as well).
        return int(self.digest[:7], 16)

    def by_name(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.tensors}

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "digest": self.digest, "model_version": self.model_version,
                "model_class": self.model_class, "active": self.active, "base_prefix": self.base_prefix,
                "adapters": self.adapters, "slots": self.slots, "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Layout:
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tensors"), list):
            raise UserError(f"{where}: not a swappable-model layout ({FORMAT}); compile the model with "
                            "`fxadapt compile ... --swappable`.")
        try:
            tensors = [Tensor(t["name"], tuple(int(d) for d in t["shape"]), t["dtype"], t.get("adapter", ""),
                              t.get("module", ""), t.get("key", ""), float(t.get("identity", 0.0)),
                              tuple(float(v) for v in t.get("identity_values", ())), int(t.get("blocks", 1)))
                       for t in data["tensors"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: damaged layout file ({type(exc).__name__}: {exc}); compile the model "
                            "again.") from None
        layout = cls(tensors, str(data.get("model_class", "")), dict(data.get("adapters", {})),
                     str(data.get("active", "")), str(data.get("base_prefix", "")), dict(data.get("slots", {})))
        if data.get("digest") != layout.digest:
            raise UserError(f"{where}: the layout's digest does not match its tensors (edited or damaged); "
                            "compile the model again.")
        return layout


def layout_path(out_dir: Path) -> Path:
    return Path(out_dir) / ADAPTERS_DIR / LAYOUT_FILE


def read_layout(out_dir: Path) -> Layout:
    """The layout of the swappable model in OUT (OUT/adapters/layout.json)."""
    path = layout_path(out_dir)
    if not path.is_file():
        raise UserError(f"{out_dir}: no {ADAPTERS_DIR}/{LAYOUT_FILE}; this is not a swappable model. Compile it "
                        "with `fxadapt compile MODEL --spec SPEC -o OUT --swappable`.")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the layout ({exc}); compile the model again.") from None
    return Layout.from_json(data, str(path))


def write_layout(layout: Layout, out_dir: Path) -> Path:
    path = layout_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, (json.dumps(layout.to_json(), indent=2) + "\n").encode())
    return path


def write_adapter_file(path: Path, layout: Layout, values: dict[str, np.ndarray]) -> None:
    """An `.onnx_adapter` file holding exactly the layout's tensors (checked), stamped with the layout id."""
    import onnxruntime as ort  # heavy native runtime, needed only to write or run adapter files

    _check_values(values, layout, str(path))
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(ADAPTER_VERSION)
    adapter.set_model_version(layout.model_version)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(values[name]))
                            for name in (t.name for t in layout.tensors)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        adapter.export_adapter(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_adapter_file(path: Path, layout: Layout) -> dict[str, np.ndarray]:
    """The tensors of an adapter file, after checking that it was written for `layout`: UserError for a
    missing, truncated or damaged file, one for another model or layout, one naming a wrong tensor."""
    import onnxruntime as ort  # as above

    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file {path} does not exist.")
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
    except (RuntimeError, ValueError) as exc:  # ORT's flatbuffer verifier: truncated or not an adapter file
        first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"adapter file {path} is truncated or not an .onnx_adapter file ({first}); write it "
                        "again with `fxadapt adapters export`.") from None
    if adapter.get_model_version() != layout.model_version:
        raise UserError(f"adapter file {path} was written for another model or adapter layout (layout id "
                        f"{adapter.get_model_version()}, this model's is {layout.model_version}); convert the "
                        "checkpoint for this model with `fxadapt adapters export DIR --model-dir OUT -o FILE`.")
    # copied: the arrays may view memory the adapter object owns, freed when it goes out of scope
    values = {name: np.array(value.numpy(), copy=True) for name, value in adapter.get_parameters().items()}
    _check_values(values, layout, str(path))
    return values


def _check_values(values: dict[str, np.ndarray], layout: Layout, where: str) -> None:
    expected = layout.by_name()
    missing = [n for n in expected if n not in values]
    extra = [n for n in values if n not in expected]
    if missing or extra:
        name, what = (missing[0], "lacks") if missing else (extra[0], "has an unknown tensor")
        raise UserError(f"adapter file {where} {what} {name!r} ({len(missing)} missing, {len(extra)} unknown); it "
                        "was made for another adapter layout. Convert the checkpoint for this model with "
                        "`fxadapt adapters export`.")
    for name, tensor in expected.items():
        value = values[name]
        if tuple(value.shape) != tensor.shape or str(value.dtype) != tensor.dtype:
            raise UserError(f"adapter file {where}: {name!r} is {str(value.dtype)}{list(value.shape)}, this model "
                            f"needs {tensor.dtype}{list(tensor.shape)}; the file belongs to another model size "
                            "or config (a rank or bottleneck size above the model's slot needs a model compiled with "
                            "it; `fxadapt adapters export` pads smaller ones).")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
