"""AdaptedModel's methods that combine adapters: average_adapter, merge_adapter, reset_adapter (a mixin).

average_adapter's formulas are in lifecycle/averaging.py; merging folds LoRA-family adapters into new
weight tensors during lowering (lifecycle/lowering.py), so reset_adapter restores the captured
weight objects bit-exactly by lowering without them.
"""

from __future__ import annotations

import torch

from ..graph_edit import slug
from ..spec import AdapterDef
from . import averaging
from .lowering import REGISTRY


class CombiningMixin:
    """Adapter-combining methods of AdaptedModel (fxadapt/model.py), which provides the attributes used here."""

    def average_adapter(self, adapter_name: str, adapter_list: list[str] | dict[str, float],
                        weights: list[float] | None = None, combine_strategy: str = "linear",
                        normalize_weights: bool = True, overwrite_ok: bool = False, set_active: bool = False,
                        svd_rank: int | None = None) -> None:
        """A new adapter averaging existing ones (lifecycle/averaging.py has the formulas)."""
        path = f"average_adapter({adapter_name!r})"
        if isinstance(adapter_list, dict):
            adapter_list, weights = list(adapter_list), list(adapter_list.values())
        names = list(adapter_list)
        self._require(names, path)
        config = averaging.averaged_config({n: self._adapters[n].config for n in names}, combine_strategy, svd_rank)
        factors = averaging.normalized_weights(names, weights, normalize_weights)
        self._check_new(adapter_name, overwrite_ok, path)
        self._add(AdapterDef(adapter_name, self._adapters[names[0]].method, config, path))
        registry = getattr(self, REGISTRY)
        try:
            with torch.no_grad():
                for placement in self._placements[adapter_name]:
                    site = placement.module_path.rpartition(".")[2]
                    sources = {n: registry[slug(n)][site] for n in names}
                    state = averaging.average_state(sources, factors, combine_strategy, svd_rank)
                    registry[slug(adapter_name)][site].load_state_dict(state)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        if set_active:
            self.set_active_adapters(adapter_name)

    def merge_adapter(self, adapter_name: str) -> None:
        """Fold a LoRA-family adapter into the weights (new tensors; the captured ones are kept for reset)."""
        self._require([adapter_name], f"merge_adapter({adapter_name!r})")
        if adapter_name in self._merged:
            return
        self._merged.append(adapter_name)
        try:
            self._relower()
        except BaseException:
            self._merged.remove(adapter_name)
            self._relower()
            raise

    def reset_adapter(self) -> None:
        """Undo merge_adapter: the graph binds the captured weight tensors again (bit-exact)."""
        self._merged = []
        self._relower()

