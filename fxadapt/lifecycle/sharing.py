"""share_parameters / unshare_parameters: tie the shared matrices of multi-task adapters (MTL-LoRA).

As `adapters` 1.3.0 (`ModelAdaptersMixin.share_parameters`, `LoRALayer.share_parameters`): at every site
the adapters of the group get ONE new `lora_A` and ONE new `lora_B` Parameter, copies of the reference
adapter's, while the task-specific matrix and the combination weights stay per task:

    for each site:  A := clone(A_ref);  B := clone(B_ref);  task_i.lora_A is A, task_i.lora_B is B  (all i)

The persistent modules are the ones every lowered graph calls, so the tie holds across re-lowering, a
forward reads the shared tensors, and `parameters()` (hence an optimizer, DDP) sees each once.
`save_adapter` writes each task's own copy of the shared values, as the reference does.
`unshare_parameters` gives every task its own copy of the current values again (the reference only
forgets the group's name and leaves the tensors tied; docs/reference-deviations.md).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..blocks import MultiTask
from ..errors import UserError
from ..methods import BY_ARCHITECTURE


def multi_task_methods() -> list[str]:
    """The methods whose adapters share tensors across a multi-task group: they declare `SHARABLE` (the
    reference's `sharable_parameters`; MTL-LoRA's lora_A and lora_B)."""
    return [module.NAME for module in BY_ARCHITECTURE.values() if getattr(module, "SHARABLE", ())]



class SharingMixin:
    """Parameter sharing of AdaptedModel (fxadapt/model.py), which provides the attributes used here."""

    def _group(self, adapter_names: Any, path: str) -> list[str]:
        """The adapter names meant by a MultiTask block, a list of names or a name ("a,b")."""
        if isinstance(adapter_names, MultiTask):
            names = list(adapter_names.children)
        elif isinstance(adapter_names, str):
            names = adapter_names.split(",")
        elif isinstance(adapter_names, list | tuple):
            names = list(adapter_names)
        else:
            names = None
        if not names or not all(isinstance(n, str) for n in names):
            raise UserError(f"{path}: expected MultiTask(\"a\", \"b\"), a list of adapter names or \"a,b\", got "
                            f"{adapter_names!r}.")
        self._require(names, path)
        return names

    def _site_modules(self, name: str) -> dict[tuple[str, int], nn.Module]:
        return {(p.role, p.layer): module for p, module in zip(self._placements[name], self.adapter_modules(name),
                                                               strict=True)}

    def share_parameters(self, adapter_names: Any, name: str | None = None,
                         reference_adapter_name: str | None = None) -> None:
        """Tie the `lora_A` / `lora_B` of multi-task adapters (MTL-LoRA) at every site to copies of the
        reference adapter's (default: the first); their task-specific matrices and weights stay their own."""
        path = f"share_parameters({adapter_names!r})"
        names = self._group(adapter_names, path)
        reference = reference_adapter_name or names[0]
        if reference not in names:
            raise UserError(f"{path}: the reference adapter {reference!r} is not one of {names}.")
        # Multi-task methods (a MultiTaskConfig in the reference: MTL-LoRA) declare the tensors they share.
        sharable = {n: getattr(self._adapters[n].method, "SHARABLE", ()) for n in names}
        wrong = [n for n in names if not sharable[n]]
        if wrong:
            raise UserError(f"{path}: adapter {wrong[0]!r} is a {self._adapters[wrong[0]].method.NAME} adapter; only "
                            f"multi-task adapters ({', '.join(multi_task_methods())}) share parameters, as in the "
                            "reference.")
        shared_names = sharable[reference]
        sites = {n: self._site_modules(n) for n in names}
        for other in names:
            if set(sites[other]) != set(sites[reference]):
                raise UserError(f"{path}: adapters {reference!r} and {other!r} adapt different sites; add them "
                                "with the same placement (selfattn/intermediate/output_lora, leave_out).")
            for key, module in sites[other].items():
                for param in shared_names:
                    if getattr(module, param).shape != getattr(sites[reference][key], param).shape:
                        raise UserError(f"{path}: {param} of {other!r} has shape "
                                        f"{tuple(getattr(module, param).shape)}, {reference!r}'s "
                                        f"{tuple(getattr(sites[reference][key], param).shape)}; shared adapters "
                                        "need the same r and n_up_projection.")
        for key, module in sites[reference].items():
            for param in shared_names:
                shared = nn.Parameter(getattr(module, param).detach().clone(),
                                      requires_grad=getattr(module, param).requires_grad)
                for other in names:
                    setattr(sites[other][key], param, shared)
        self._shared[name or ",".join(names)] = names

    def unshare_parameters(self, adapter_names: Any, name: str | None = None) -> None:
        """Give each adapter of a shared group its own copy of the (current) shared matrices again."""
        path = f"unshare_parameters({adapter_names!r})"
        names = self._group(adapter_names, path)
        key = name or ",".join(names)
        if key not in self._shared:
            known = ", ".join(map(repr, self._shared)) or "none"
            raise UserError(f"{path}: no shared parameters named {key!r}; shared groups: {known}.")
        for adapter in self._shared.pop(key):
            if adapter not in self._adapters:  # deleted since
                continue
            for module in self._site_modules(adapter).values():
                for param in getattr(self._adapters[adapter].method, "SHARABLE", ()):
                    value = getattr(module, param)
                    setattr(module, param, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))

    @property
    def shared_parameters(self) -> dict[str, list[str]]:
        """The shared groups: name -> adapter names."""
        return {k: list(v) for k, v in self._shared.items()}
