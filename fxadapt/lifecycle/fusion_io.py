"""AdaptedModel's AdapterFusion methods (a mixin of model.py), as in `adapters` 1.3.0:

    add_adapter_fusion(Fuse("a", "b") | ["a", "b"] | "a,b", config="dynamic", name=None, overwrite_ok, set_active)
    delete_adapter_fusion(Fuse(...) | ["a", "b"] | "a,b")
    save_adapter_fusion(DIR, "a,b")  ->  DIR/adapter_fusion_config.json + DIR/model_adapter_fusion.safetensors
    load_adapter_fusion(DIR, load_as=None, set_active=False)
    get_fusion_regularization_loss()    0.01 · sum ||I - V||^2 over the trainable value matrices

A fusion's modules live in the registry `fusions.<fusion>.<site>` (lifecycle/lowering.py); train_adapter_fusion
is in model.py beside train_adapter. Saved tensors carry the reference's keys,
`<layer module>.adapter_fusion_layer.<fusion name>.<param>` (e.g. `encoder.layer.0.output.adapter_fusion_layer.a,b.
query.weight`), so `adapters` 1.3.0 loads the directory with `load_adapter_fusion(DIR, use_safetensors=True)` and
fxadapt reads the reference's `pytorch_model_adapter_fusion.bin` as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..blocks import Fuse
from ..checkpoints import adapterhub
from ..checkpoints.writer import write_into
from ..compose import fusion_spec
from ..compose.rules import blocks
from ..errors import UserError
from ..graph_edit import slug
from . import saving
from .lowering import FUSIONS, instantiate_fusion


class FusionMixin:
    """AdapterFusion methods of AdaptedModel (fxadapt/model.py), which provides the attributes used here."""

    def _fusion_modules(self, name: str) -> list[torch.nn.Module]:
        return [self.get_submodule(p.module_path) for p in self._fusion_placements[name]]

    def _fusion_key(self, adapter_names: Any, path: str) -> str:
        """The fusion name meant by a Fuse block, a list of adapter names or a name ("a,b")."""
        if isinstance(adapter_names, Fuse):
            return adapter_names.name
        if isinstance(adapter_names, list | tuple) and all(isinstance(n, str) for n in adapter_names):
            return ",".join(adapter_names)
        if isinstance(adapter_names, str):
            return adapter_names
        raise UserError(f"{path}: expected a Fuse block, a list of adapter names or a fusion name such as \"a,b\", "
                        f"got {adapter_names!r}.")

    def _require_fusion(self, name: str, path: str) -> None:
        if name not in self._fusions:
            known = ", ".join(map(repr, self._fusions)) or "none (add one with add_adapter_fusion)"
            raise UserError(f"{path}: no AdapterFusion named {name!r}; added fusions: {known}.")

    def add_adapter_fusion(self, adapter_names: Any, config: str | dict | None = None, name: str | None = None,
                           overwrite_ok: bool = False, set_active: bool = False) -> None:
        """AdapterFusion over bottleneck adapters (`config`: "dynamic" (default), "static" or an
        AdapterFusionConfig dict), initialised as the reference's; `set_active` activates Fuse(*adapter_names)."""
        path = f"add_adapter_fusion({adapter_names!r})"
        if isinstance(adapter_names, Fuse):
            name = name or adapter_names.given_name
            children = adapter_names.children
        elif isinstance(adapter_names, str):
            children = adapter_names.split(",")
        elif isinstance(adapter_names, list | tuple):
            children = list(adapter_names)
        else:
            children = None
        if not children or not all(isinstance(c, str) and c for c in children):
            raise UserError(f"{path}: expected Fuse(\"a\", \"b\"), a list of adapter names or \"a,b\"; a fusion "
                            "attends over adapters named directly (as in the reference).")
        self._require(children, path)
        # Fusable methods (their FUSABLE declaration) are checked here; others are refused by check_setup.
        bottlenecks = all(getattr(self._adapters[n].method, "FUSABLE", False) for n in children)
        for location in ("mh_adapter", "output_adapter") if bottlenecks else ():  # the reference's common_config_value
            values = {n: getattr(self._adapters[n].config, location) for n in children}
            if len(set(values.values())) > 1:
                raise UserError(f"{path}: the fused adapters must all set {location} alike (the reference's rule: a "
                                f"fusion layer sits where all of them act); got {values}.")
        name = name or ",".join(children)
        if "." in name:
            raise UserError(f"{path}: a fusion name cannot contain \".\" (it becomes a module name), got {name!r}.")
        if name in self._fusions:
            if not overwrite_ok:
                raise UserError(f"{path}: an AdapterFusion named {name!r} already exists; delete_adapter_fusion("
                                f"{name!r}) first or pass overwrite_ok=True.")
            self.delete_adapter_fusion(name)
        clash = next((n for n in self._fusions if slug(n) == slug(name)), None)
        if clash is not None:
            raise UserError(f"{path}: fusion names {name!r} and {clash!r} map to the same module name {slug(name)!r}.")
        if config is None:
            config = "dynamic"
        if isinstance(config, str):
            item: dict[str, Any] = {"adapters": children, "config": config}
        elif isinstance(config, dict):
            item = {"adapters": children, **{k: v for k, v in config.items() if k != "architecture"}}
        else:
            raise UserError(f"{path}: config must be \"dynamic\", \"static\" or an AdapterFusionConfig dict, got "
                            f"{type(config).__name__}.")
        fusion = fusion_spec._fusion(item, self._adapters, path, Path("."))
        fusion.name, fusion.path = name, path
        self._fusion_placements[name] = instantiate_fusion(self.base, self._adapters, fusion, self, self._prefix,
                                                           self._hidden, self._fusion_dropout(fusion))
        self._fusions[name] = fusion
        if set_active:
            self.set_active_adapters(Fuse(*children, name=name if name != ",".join(children) else None))

    def _fusion_dropout(self, fusion: fusion_spec.FusionDef) -> float:
        # The reference: the config's dropout_prob, else the model's attention_probs_dropout_prob.
        return float(fusion.config.get("dropout_prob") or getattr(self.config, "attention_probs_dropout_prob", 0.0)
                     or 0.0)

    def delete_adapter_fusion(self, adapter_names: Any) -> None:
        path = f"delete_adapter_fusion({adapter_names!r})"
        name = self._fusion_key(adapter_names, path)
        self._require_fusion(name, path)
        self._drop_fusion(name)
        if name in _fusion_names(self._setup):
            self._set_setup([], None)  # as the reference, which deactivates a setup using the deleted fusion

    def _drop_fusion(self, name: str) -> None:
        del self._fusions[name], self._fusion_placements[name]
        registry = getattr(self, FUSIONS)
        if slug(name) in registry:
            del registry[slug(name)]

    def save_adapter_fusion(self, save_directory: str | Path, adapter_names: Any,
                            with_head: bool | str = False) -> None:
        """Write the fusion in the AdapterHub layout (see the module docstring), atomically."""
        path = f"save_adapter_fusion({adapter_names!r})"
        name = self._fusion_key(adapter_names, path)
        self._require_fusion(name, path)
        head_name = with_head if isinstance(with_head, str) else name
        if with_head and head_name not in self.heads:
            raise UserError(f"{path}: with_head: no head named {head_name!r}.")
        fusion = self._fusions[name]
        tensors = {}
        for placement in self._fusion_placements[name]:
            module = self.get_submodule(placement.module_path)
            for key, tensor in module.state_dict().items():
                tensors[f"{placement.reference_module}.{name}.{key}"] = tensor.detach().contiguous().clone()
        facts = self._facts()
        data = {"adapter_names": list(fusion.adapters), "config": dict(fusion.config), **facts, "name": name}
        known = (fusion_spec.CONFIG_FILE, *fusion_spec.WEIGHT_FILES, saving.HEAD_CONFIG, *saving.HEAD_WEIGHT_FILES)
        with write_into(Path(save_directory), path, known, fusion_spec.CONFIG_FILE) as out:
            adapterhub.write_weights(tensors, out, fusion_spec.WEIGHT_FILES)
            (out / fusion_spec.CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
            if with_head:
                saving.save_head(out, head_name, self.heads[head_name], facts)

    def load_adapter_fusion(self, adapter_fusion_name_or_path: str | Path, load_as: str | None = None,
                            set_active: bool = False, with_head: bool = True) -> str:
        """Load a fusion saved by save_adapter_fusion (fxadapt's or the reference's); its adapters must be
        loaded already. Returns its name in this model."""
        directory = Path(adapter_fusion_name_or_path)
        path = f"load_adapter_fusion({str(directory)!r})"
        if not directory.is_dir():
            raise UserError(f"{path}: {directory} is not a directory written by save_adapter_fusion.")
        data = fusion_spec._read_json(directory, path)
        names, config, saved = data.get("adapter_names"), data.get("config"), data.get("name")
        if isinstance(names, str):
            names = names.split(",")
        if not isinstance(config, dict) or not isinstance(names, list) or not names:
            raise UserError(f"{path}: {directory / fusion_spec.CONFIG_FILE} lacks \"adapter_names\" or \"config\".")
        saved = saved if isinstance(saved, str) and saved else ",".join(names)
        hidden = data.get("hidden_size")
        if self._hidden is not None and isinstance(hidden, int) and hidden != self._hidden:
            raise UserError(f"{path}: the fusion in {directory} was trained for hidden size {hidden}, but this "
                            f"model's hidden size is {self._hidden}.")
        missing = [n for n in names if n not in self._adapters]
        if missing:
            raise UserError(f"{path}: the fusion attends over adapter {missing[0]!r}, which this model does not have; "
                            "load its adapters (load_adapter) first.")
        fusion_spec.read_weights(directory, path)  # a missing or corrupt file fails before anything is added
        name = load_as or saved
        self.add_adapter_fusion(list(names), config, name=name, overwrite_ok=True)
        try:
            fusion_spec.load_weights([(p.reference_module, self.get_submodule(p.module_path))
                                      for p in self._fusion_placements[name]], directory, saved, self._prefix, path)
            head = saving.read_head(directory, self._hidden, 0.0, path) if with_head else None
        except BaseException:
            self.delete_adapter_fusion(name)
            raise
        if head is not None:
            self.heads[head[0] if load_as is None else name] = head[1].to(next(self.base.parameters()).device).train(
                self.training)
        if set_active:
            self.set_active_adapters(Fuse(*names, name=name if name != ",".join(names) else None))
        return name

    def get_fusion_regularization_loss(self) -> torch.Tensor | None:
        """The reference's regularization of trainable fusion value matrices towards the identity (its
        AdapterTrainer adds it after each step): 0.01 · sum over fusions and sites of ||I - V||_F^2."""
        loss = None
        for name in self._fusions:
            for module in self._fusion_modules(name):
                value = getattr(module, "value", None)
                if value is not None and value.weight.requires_grad:
                    eye = torch.eye(value.weight.shape[0], device=value.weight.device, dtype=value.weight.dtype)
                    term = 0.01 * (eye - value.weight).pow(2).sum()
                    loss = term if loss is None else loss + term
        return loss


def _fusion_names(setup: Any) -> set[str]:
    """The fusion names the Fuse blocks of a parsed setup (fxadapt.composition.Block) use."""
    return {b.fusion_name for b in blocks(setup) if b.kind == "fuse"} if setup is not None else set()

