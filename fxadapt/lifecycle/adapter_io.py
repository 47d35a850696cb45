"""AdaptedModel's checkpoint methods: save_adapter, save_all_adapters, load_adapter (a mixin of model.py).

Files and layouts are described in lifecycle/saving.py; loading goes through the same checkpoint
readers as a spec's `{"load": DIR}` (AdapterHub or PEFT, detected from adapter_config.json), writing
into the AdaptedModel's persistent adapter modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoints import adapterhub
from ..checkpoints.bounds import allocation_bound
from ..checkpoints.loading import load_into
from ..errors import UserError
from ..names import check_name
from ..spec import resolve_adapter
from . import saving


class AdapterIOMixin:
    """Checkpoint methods of AdaptedModel (fxadapt/model.py), which provides the attributes used here."""

    def _facts(self) -> dict[str, Any]:
        return saving.model_facts(self.config, self.captured.info.get("class", ""), self.captured.source)

    def save_adapter(self, save_directory: str | Path, adapter_name: str, with_head: bool = True,
                     peft_layout: bool = True) -> list[str]:
        """Save one adapter (AdapterHub layout; plain LoRA also in PEFT's, under DIR/peft) atomically."""
        self._require([adapter_name], f"save_adapter({adapter_name!r})")
        head = self.heads[adapter_name] if with_head and adapter_name in self.heads else None
        return saving.save_adapter(Path(save_directory), self, self._adapters[adapter_name],
                                   self._placements[adapter_name], self._facts(), self._lowered.sites, head,
                                   peft_layout)

    def save_all_adapters(self, save_directory: str | Path, with_head: bool = True) -> None:
        """Save every adapter to `save_directory/<name>` (names are checked when they enter, so each stays
        inside `save_directory`)."""
        for name in self._adapters:
            check_name(name, f"save_all_adapters: adapter {name!r}")
            self.save_adapter(Path(save_directory) / name, name, with_head)

    def load_adapter(self, adapter_name_or_path: str | Path, load_as: str | None = None, set_active: bool = False,
                     with_head: bool = True) -> str:
        """Load a saved adapter (AdapterHub or PEFT directory); returns its name in this model."""
        directory = Path(adapter_name_or_path)
        path = f"load_adapter({str(directory)!r})"
        adapter = resolve_adapter(load_as or "loaded", {"load": str(directory)}, path)
        saved = saving.saved_name(directory)
        if load_as is None and saved is not None:  # a name from an untrusted file: check it like a user's
            check_name(saved, f"{path}: {directory / adapterhub.CONFIG_FILE} \"name\"")
        adapter.name = load_as or saved or directory.name
        self._check_new(adapter.name, False, path)
        with allocation_bound([directory], path):  # the config's sizes cannot allocate beyond the tensors
            gm, placements = self._add(adapter)
        try:
            load_into(gm, placements, adapter.load, path, self._prefix, self._hidden)
            if gm.meta.get("fxadapt", {}).get("overridden"):
                raise UserError(f"{path}: the checkpoint also replaces base-model weights (PEFT bias or "
                                "modules_to_save); load it through a spec (fxadapt compile) instead.")
            head = saving.read_head(directory, self._hidden, 0.0, path) if with_head else None
        except BaseException:
            self.delete_adapter(adapter.name)
            raise
        if head is not None:
            self.heads[adapter.name] = head[1].to(next(self.base.parameters()).device).train(self.training)
        if set_active:
            self.set_active_adapters(adapter.name)
        return adapter.name

