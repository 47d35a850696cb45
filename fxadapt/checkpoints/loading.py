"""Load a checkpoint directory of either format: `read_config` gives the method and its config for a
`{"load": DIR}` spec entry; `load_into` copies the weights into the inserted adapter modules.

Above the method registry (it maps a saved config to its method); adapterhub.py and peft.py stay below it."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from torch import fx

from .. import methods
from ..methods.base import MethodConfig
from ..methods.lora import peft as peft_lora
from . import adapterhub, peft


def read_config(directory: Path, path: str) -> tuple[ModuleType, MethodConfig]:
    """(method module, validated config) of the checkpoint in `directory`."""
    if peft.is_peft(adapterhub.read_checkpoint_json(directory, path)):
        return peft_lora, peft.read_config(directory, path)
    values = adapterhub.read_config(directory, path)
    module = methods.method_for_config(values, path)
    return module, module.Config.from_dict(values, path)


def load_into(gm: fx.GraphModule, placements: list, directory: Path, path: str, base_prefix: str,
              model_hidden: int | None) -> int:
    """Copy the checkpoint's tensors into `placements`' modules; returns the number of tensors loaded."""
    if peft.is_peft(adapterhub.read_checkpoint_json(directory, path)):
        return peft.load_into(gm, placements, directory, path, base_prefix)
    return adapterhub.load_into(gm, placements, directory, path, base_prefix, model_hidden)
