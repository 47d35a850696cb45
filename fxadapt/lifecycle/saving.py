"""save_adapter / load_adapter directories, written atomically.

    DIR/adapter_config.json + adapter.safetensors     AdapterHub layout (checkpoints/adapterhub.py); keys
                                                      `<reference module>.<name>.<param>`
    DIR/head_config.json + model_head.safetensors     the adapter's flex head, if it has one (`heads.<name>.*`)
    DIR/peft/adapter_config.json + adapter_model.safetensors   plain LoRA adapters also in PEFT's layout

Everything is written into a temporary directory beside DIR and moved over DIR at the end, so a
failed save leaves the previous files as they were. `adapters` 1.3.0 reads the directory with
`load_adapter(DIR, use_safetensors=True)`; PEFT with `PeftModel.from_pretrained(model, DIR/peft)`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..checkpoints import adapterhub
from ..errors import UserError
from ..methods.base import Placement
from ..sites import SiteMap
from ..spec import AdapterDef
from . import peft_layout
from .heads import ClassificationHead

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "model_head.safetensors"
PEFT_DIR = "peft"


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
    """Write one adapter (and its head) to `directory`; returns the layouts written."""
    layouts = ["adapterhub"]
    with atomic_directory(Path(directory), "save_adapter") as out:
        adapterhub.save(holder, placements, out, adapter.name, reference_config(adapter.config.to_dict()), facts)
        if head is not None:
            _save_head(out, adapter.name, head, facts)
            layouts.append("head")
        if peft and placements and all(p.method == "lora" for p in placements) and not getattr(
                adapter.config, "use_gating", False):
            (out / PEFT_DIR).mkdir()
            modules = {p.module_path: holder.get_submodule(p.module_path) for p in placements}
            peft_layout.write(out / PEFT_DIR, placements, modules, adapter.config, sites, facts.get("model_name"))
            layouts.append("peft")
    return layouts


@contextlib.contextmanager
def atomic_directory(directory: Path, path: str) -> Iterator[Path]:
    """Yield an empty staging directory beside `directory` that replaces it when the block ends without an
    error; on any error `directory` keeps its previous files. `path` names the call in error messages."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{path}: {directory} exists and is not a directory; choose another path.")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{directory.name}.fxadapt-", dir=directory.parent))
    except OSError as exc:
        raise UserError(f"{path}: cannot write into {directory.parent} ({exc.strerror}).") from None
    try:
        out = stage / "out"
        out.mkdir()
        yield out
        adapterhub.replace_dir(out, directory)
    except OSError as exc:
        raise UserError(f"{path}: cannot write {directory} ({exc.strerror or exc}); its previous files are "
                        "unchanged.") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _save_head(directory: Path, name: str, head: ClassificationHead, facts: dict[str, Any]) -> None:
    tensors = {f"heads.{name}.{k}": v.detach().contiguous().clone() for k, v in head.state_dict().items()}
    save_file(tensors, str(directory / HEAD_WEIGHTS))
    model_class = (facts.get("model_class") or "").removesuffix("Model") + "AdapterModel"
    data = {"config": head.config, **facts, "model_class": model_class, "name": name}
    (directory / HEAD_CONFIG).write_text(json.dumps(data, indent=2) + "\n")


def read_head(directory: Path, hidden: int, dropout: float, path: str) -> tuple[str, ClassificationHead] | None:
    """(saved name, head with its weights) of a saved flex head, or None when the directory has none."""
    config_file = directory / HEAD_CONFIG
    if not config_file.is_file():
        return None
    try:
        data = json.loads(config_file.read_text())
        config = data["config"]
        if config.get("head_type") != "classification":
            raise UserError(f"{path}: {config_file} holds a {config.get('head_type')!r} head; fxadapt loads "
                            "classification heads only.")
        head = ClassificationHead(hidden, config["num_labels"], config.get("layers", 2),
                                  config.get("activation_function", "tanh"),
                                  config.get("dropout_prob") if config.get("dropout_prob") is not None else dropout)
        weights = load_file(str(directory / HEAD_WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: the head in {directory} is incomplete or corrupt ({type(exc).__name__}: {exc}).") \
            from None
    prefix = f"heads.{data['name']}."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: the head in {directory} does not fit this model ({str(exc).splitlines()[0]}).") \
            from None
    return data["name"], head



def saved_name(directory: Path) -> str | None:
    """The adapter name an AdapterHub directory was saved under (None for PEFT or unreadable directories)."""
    try:
        data = json.loads((Path(directory) / adapterhub.CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else None
