"""train_adapter / train_adapter_fusion / freeze_model and gradient checkpointing of AdaptedModel.

As `adapters` 1.3.0: training a setup freezes the captured model, makes the setup's adapters (or, for
train_adapter_fusion, its fusion layers) trainable together with the task and flex heads, activates the
setup and switches to train mode. Everything else keeps requires_grad False, so an optimizer over
`parameters()` that skips frozen tensors touches only what is trained.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError
from .fusion_io import _fusion_names


class TrainingMixin:
    """Training switches of AdaptedModel (fxadapt/model.py), which provides the attributes used here."""

    def _head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the captured model's task head (outside its base model), not tied to base weights."""
        inside = {id(p) for n, p in self.base.named_parameters(remove_duplicate=False)
                  if self._prefix and n.startswith(self._prefix + ".")}
        if not inside:  # a bare model (BertModel): everything is base model
            return []
        return [p for n, p in self.base.named_parameters() if not n.startswith(self._prefix + ".") and id(p) not in
                inside]

    def _input_embeddings(self) -> list[nn.Parameter]:
        """The token embedding table(s): weights of `embedding` ops indexed by the input_ids placeholder."""
        graph = self._lowered.graph
        ids = [n for n in graph.graph.nodes if n.op == "placeholder" and n.name == "input_ids"]
        return [graph.get_parameter(n.args[0].target) for n in graph.graph.nodes
                if n.op == "call_function" and "embedding" in str(n.target) and n.args[1:2] == tuple(ids[:1])
                and getattr(n.args[0], "op", "") == "get_attr"]

    def freeze_model(self, freeze: bool = True) -> None:
        """Freeze (or unfreeze, for full fine-tuning) every weight of the captured model."""
        for param in self.base.parameters():
            param.requires_grad = not freeze

    def _prepare_training(self, path: str, names: list[str], adapters: bool, fusions: set[str],
                          train_embeddings: bool = False) -> None:
        """Freeze the base model; make trainable the task/flex heads, the adapters in `names` (if `adapters`) and
        the fusions in `fusions`; everything else frozen."""
        merged = [n for n in names if n in self._merged]
        if merged:
            raise UserError(f"{path}: adapter {merged[0]!r} is merged into the weights; call reset_adapter() before "
                            "training it.")
        self.freeze_model(True)
        for param in self._head_parameters():
            param.requires_grad = True
        if train_embeddings:
            for param in self._input_embeddings():
                param.requires_grad = True
        for name in self._adapters:
            for param in nn.ModuleList(self.adapter_modules(name)).parameters():
                param.requires_grad = adapters and name in names
        for name in self._fusions:
            for param in nn.ModuleList(self._fusion_modules(name)).parameters():
                param.requires_grad = name in fusions
        for param in self.heads.parameters():
            param.requires_grad = True

    def train_adapter(self, adapter_setup: Any, train_embeddings: bool = False) -> None:
        """Activate `adapter_setup` (a name, a list or a composition block) and make only its adapters (and task
        heads) trainable, as the reference does; fusions stay frozen (train_adapter_fusion trains them)."""
        path = f"train_adapter({adapter_setup!r})"
        names, block = self._parse_setup(adapter_setup, path)
        if not names:
            raise UserError(f"{path}: nothing to train; pass the name of an added adapter.")
        self._prepare_training(path, names, True, set(), train_embeddings)
        if not any(p.requires_grad for n in names for m in self.adapter_modules(n) for p in m.parameters()):
            raise UserError(f"{path}: {', '.join(map(repr, names))} has no trainable parameters.")
        self.set_active_adapters(adapter_setup if block is not None else names)
        self.train()

    def train_adapter_fusion(self, adapter_setup: Any, unfreeze_adapters: bool = False) -> None:
        """Activate a setup with Fuse blocks (e.g. Fuse("a", "b")) and train only its AdapterFusion layers (and task
        heads); the fused adapters stay frozen unless `unfreeze_adapters`, as in the reference."""
        path = f"train_adapter_fusion({adapter_setup!r})"
        names, block = self._parse_setup(adapter_setup, path)
        fusions = _fusion_names(block)
        if not fusions:
            raise UserError(f"{path}: the setup has no Fuse block, so there is no fusion to train; pass "
                            "Fuse(\"a\", \"b\") (after add_adapter_fusion), or use train_adapter for adapters.")
        self._prepare_training(path, names, unfreeze_adapters, fusions)
        self.set_active_adapters(adapter_setup)
        self.train()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint activations per transformer layer (lifecycle/checkpointing.py)."""
        self._checkpointing = True
        self._relower()

    def gradient_checkpointing_disable(self) -> None:
        self._checkpointing = False
        self._relower()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing
