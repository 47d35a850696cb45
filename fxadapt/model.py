"""`fxadapt.adapt(model)` -> AdaptedModel: the adapter lifecycle of AdapterHub `adapters`, on a captured graph.

The model is captured once (torch.export). Every change of the adapter setup (add/delete/activate,
merge/reset) lowers it again: a fresh copy of the pristine graph -> find_sites -> insert_adapters ->
the persistent adapter modules kept in `self.fxadapt` swapped in (lifecycle/lowering.py). Base weights
live once, in `self.base` (the captured GraphModule); the lowered graph shares them and is not a
registered submodule, so `parameters()`/`state_dict()` list every tensor exactly once:

    base.<model parameter>          the captured model (frozen by train_adapter, except a task head)
    fxadapt.<adapter>.<site>.<p>    adapter modules, named like the reference's (adapter_down.0, lora_A)
    fusions.<fusion>.<site>.<p>     AdapterFusion modules (add_adapter_fusion; query, key, value)
    heads.<head>.<i>.<p>            flex heads added with add_classification_head

A setup is an adapter name, a list of names, or a composition block (fxadapt.blocks: Stack, Parallel, Fuse,
Split, BatchSplit, Average, MultiTask), lowered by the CLI's lower_composition pass over the same modules.

Method names and semantics follow `adapters` 1.3.0 (model_mixin.py); see docs/lifecycle.md.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from . import methods
from .blocks import AdapterCompositionBlock, from_json
from .capture import Captured
from .compose.rules import blocks
from .composition import Block, check_sizes, multi_task_children, parse_composition
from .errors import UserError
from .graph_edit import slug
from .lifecycle import checkpointing, exporting, summary
from .lifecycle.adapter_io import AdapterIOMixin
from .lifecycle.base_graph import capture_base, unlock_modes
from .lifecycle.combining import CombiningMixin
from .lifecycle.fusion_io import FusionMixin, _fusion_names
from .lifecycle.heads import HeadsMixin, loss_type_of, task_loss
from .lifecycle.lowering import FUSIONS, REGISTRY, Lowered, instantiate, lower
from .lifecycle.modes import attention_dropout_of, set_mode
from .lifecycle.sharing import SharingMixin
from .lifecycle.training import TrainingMixin
from .methods.base import MethodConfig, Placement
from .names import check_name
from .spec import AdapterDef, Spec, resolve_adapter

_OPTIONAL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values",
                    "decoder_input_ids")


def adapt(model: nn.Module | str, example_inputs: dict[str, torch.Tensor] | None = None, task: str | None = None,
          attention_dropout: float | None = None) -> AdaptedModel:
    """Capture `model` (an nn.Module, a Hugging Face directory / hub id, or `builtin:NAME`) for adapters.

    `example_inputs` (batch >= 2) chooses the forward inputs; by default input_ids and attention_mask.
    `attention_dropout` overrides the attention-probability dropout used in training mode (lifecycle/modes.py).
    """
    captured, eager = capture_base(model, example_inputs, task)
    return AdaptedModel(captured, eager, attention_dropout)


class AdaptedModel(AdapterIOMixin, CombiningMixin, FusionMixin, SharingMixin, TrainingMixin, HeadsMixin, nn.Module):
    """A captured model with AdapterHub-style adapter management; `forward` runs the lowered graph."""

    supports_gradient_checkpointing = True

    def __init__(self, captured: Captured, eager: nn.Module | None = None,
                 attention_dropout: float | None = None) -> None:
        """Wrap a capture (lifecycle/base_graph.capture_base); `eager` is the captured model, for its loss type."""
        super().__init__()
        unlock_modes(captured.module)
        self.base = captured.module
        setattr(self, REGISTRY, nn.ModuleDict())
        setattr(self, FUSIONS, nn.ModuleDict())
        self.heads = nn.ModuleDict()
        self.captured = captured
        self.config = captured.config
        self.main_input_name = captured.input_names[0]
        self._adapters: dict[str, AdapterDef] = {}
        self._placements: dict[str, list[Placement]] = {}
        self._active: list[str] = []  # the active adapters (a composition's, flattened)
        self._setup: Block | None = None  # the active composition block, if one was given
        self._fusions: dict = {}  # name -> compose.fusion_spec.FusionDef
        self._fusion_placements: dict[str, list[Placement]] = {}
        self._merged: list[str] = []
        self._shared: dict[str, list[str]] = {}  # share_parameters groups: name -> adapter names
        self.active_head: str | None = None
        self._prefix = captured.info.get("base_model_prefix", "")
        self._hidden = getattr(self.config, "hidden_size", None)
        self._loss_type = loss_type_of(eager, captured.info.get("class", ""))
        # Trainer passes num_items_in_batch only to models that say they use it (the LM losses do).
        self.accepts_loss_kwargs = self._loss_type in ("ForCausalLM", "ForMaskedLM")
        self._attention_dropout = attention_dropout if attention_dropout is not None else attention_dropout_of(
            self.config)
        self._checkpointing = False
        self.training = False  # captured in eval mode; lowered as such
        self._relower()
        self.eval()

    # -- the lowered graph ---------------------------------------------------------------------------------
    @property
    def graph_module(self) -> fx.GraphModule:
        """The graph that `forward` runs: the base graph with the active adapters inserted."""
        return self._lowered_graph

    def _relower(self) -> None:
        self._set_lowered(self._fresh())

    @property
    def _composed(self) -> Block | None:
        """The setup lowered by lower_composition: a block other than a Stack of one adapter name (which is that
        adapter alone, as in the reference, and lowers like it for every method)."""
        setup = self._setup
        if setup is None or (setup.kind == "stack" and len(setup.children) == 1 and isinstance(setup.children[0], str)):
            return None
        return setup

    def _fresh(self) -> Lowered:
        setup = self._composed
        fusions = [self._fusions[n] for n in sorted(_fusion_names(setup))] if setup is not None else []
        return lower(self.base, self._adapters, self._active, self._merged, self, self._prefix, self._hidden,
                     setup, fusions)

    def _set_lowered(self, lowered: Lowered) -> None:
        graph = lowered.graph
        if self.training:
            set_mode(graph, True, self._attention_dropout)
        if self._checkpointing:
            graph = checkpointing.split_by_layer(graph)
        # Not a registered submodule: it shares base's and the registry's tensors (see the module docstring).
        object.__setattr__(self, "_lowered", lowered)
        object.__setattr__(self, "_lowered_graph", graph)

    def train(self, mode: bool = True) -> AdaptedModel:
        """Train/eval mode: dropout flags in the graph (lifecycle/modes.py), adapters' and heads' own modules."""
        self.training = mode
        for child in self.children():
            child.train(mode)
        if "_lowered_graph" in self.__dict__:
            set_mode(self._lowered_graph, mode, self._attention_dropout)
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if "_lowered" in self.__dict__:
            self._relower()  # .to()/.half() may replace buffer objects: bind the graph to the new ones
        return self

    # -- adapters ------------------------------------------------------------------------------------------
    def _definition(self, name: str, config: Any, path: str) -> AdapterDef:
        if isinstance(config, MethodConfig):
            modules = [*methods.BY_ARCHITECTURE.values(), *(m for m, _ in methods.PRESETS.values())]
            module = next((m for m in modules if type(config) is m.Config), None)
            if module is None:
                raise UserError(f"{path}: {type(config).__name__} is not the config class of a registered method.")
            config = copy.deepcopy(config)
            config.validate(path)
            return AdapterDef(name, module, config, path)
        if isinstance(config, str | dict):
            return resolve_adapter(name, config, path)
        raise UserError(f"{path}: expected a config string such as \"lora[r=8]\", a config dict or a MethodConfig, "
                        f"got {type(config).__name__}.")

    def _check_new(self, name: str, overwrite_ok: bool, path: str) -> None:
        check_name(name, path)
        if name in self._adapters:
            if not overwrite_ok:
                raise UserError(f"{path}: an adapter named {name!r} already exists; delete_adapter({name!r}) first or "
                                "pass overwrite_ok=True.")
            self.delete_adapter(name)
        clash = next((n for n in self._adapters if slug(n) == slug(name)), None)
        if clash is not None:
            raise UserError(f"{path}: adapter names {name!r} and {clash!r} map to the same module name "
                            f"{slug(name)!r}; choose another name.")

    def _require(self, names: list[str], path: str) -> None:
        for name in names:
            if name not in self._adapters:
                known = ", ".join(map(repr, self._adapters)) or "none (add one with add_adapter)"
                raise UserError(f"{path}: unknown adapter {name!r}; added adapters: {known}.")

    def _parse_setup(self, setup: Any, path: str) -> tuple[list[str], Block | None]:
        """An adapter setup as (the adapter names, the parsed composition block or None). A block (fxadapt.blocks,
        or its spec form {"stack": [...]}) is checked with the reference's nesting rules; its Fuse blocks need an
        AdapterFusion (add_adapter_fusion / load_adapter_fusion)."""
        if isinstance(setup, list | tuple) and len(dict.fromkeys(setup)) > 1:
            setup = {"stack": list(dict.fromkeys(setup))}  # as the reference: a list of names is a Stack
        if not isinstance(setup, AdapterCompositionBlock | dict):
            return self._names(setup, path), None
        block = parse_composition(setup.to_json() if isinstance(setup, AdapterCompositionBlock) else setup,
                                  set(self._adapters), path)
        for fuse in (b for b in blocks(block) if b.kind == "fuse"):
            if fuse.fusion_name not in self._fusions:
                children = ", ".join(repr(c if isinstance(c, str) else c.last()) for c in fuse.children)
                raise UserError(f"{fuse.path}: no AdapterFusion {fuse.fusion_name!r} for this Fuse block; add it "
                                f"with add_adapter_fusion(Fuse({children})) or load_adapter_fusion(DIR) first.")
        return list(dict.fromkeys(block.flatten())), block

    def _names(self, setup: Any, path: str) -> list[str]:
        """An adapter setup (a name, a list of names, or None) as a list of names."""
        if setup is None:
            return []
        names = [setup] if isinstance(setup, str) else list(setup) if isinstance(setup, list | tuple) else None
        if names is None or not all(isinstance(n, str) for n in names):
            raise UserError(f"{path}: expected an adapter name, a list of names or a composition block such as "
                            f"Stack(\"a\", \"b\") (fxadapt.Stack, Parallel, Fuse, ...), got {setup!r}.")
        self._require(names, path)
        return list(dict.fromkeys(names))

    def add_adapter(self, adapter_name: str, config: Any = "seq_bn", overwrite_ok: bool = False,
                    set_active: bool = False) -> None:
        """Add a new adapter (initialised as its method does); `config` as in a spec, or a MethodConfig."""
        path = f"add_adapter({adapter_name!r})"
        self._check_new(adapter_name, overwrite_ok, path)
        self._add(self._definition(adapter_name, config, path))
        if set_active:
            self.set_active_adapters(adapter_name)

    def _add(self, adapter: AdapterDef) -> tuple[fx.GraphModule, list[Placement]]:
        gm, placements = instantiate(self.base, adapter, self, self._prefix, self._hidden)
        self._adapters[adapter.name] = adapter
        self._placements[adapter.name] = placements
        return gm, placements

    def delete_adapter(self, adapter_name: str) -> None:
        self._require([adapter_name], f"delete_adapter({adapter_name!r})")
        fusions = [f for f, d in self._fusions.items() if adapter_name in d.adapters]
        for fusion in fusions:
            self._drop_fusion(fusion)  # a fusion over a deleted adapter cannot run
        del self._adapters[adapter_name], self._placements[adapter_name]
        self._shared = {k: [n for n in v if n != adapter_name] for k, v in self._shared.items() if v != [adapter_name]}
        registry = getattr(self, REGISTRY)
        if slug(adapter_name) in registry:
            del registry[slug(adapter_name)]
        relower = adapter_name in self._active or adapter_name in self._merged
        if self._setup is not None and adapter_name in self._active:
            self._setup = None  # a composition without one of its adapters: deactivated
            self._active = []
        self._active = [n for n in self._active if n != adapter_name]
        self._merged = [n for n in self._merged if n != adapter_name]
        if relower:
            self._relower()

    def set_active_adapters(self, adapter_setup: Any) -> None:
        """Activate an adapter, a composition block (Stack, Parallel, Fuse, Split, BatchSplit, Average, MultiTask)
        or a list of names (a Stack, as in the reference); None deactivates all. Re-lowers."""
        names, block = self._parse_setup(adapter_setup, "set_active_adapters")
        self._set_setup(names, block)
        last = names[0] if len(names) == 1 and block is None else (
            block.children[-1] if block is not None and block.kind == "stack" else None)
        if isinstance(last, str) and last in self.heads:
            self.active_head = last  # as the reference: a head named like the (last stacked) adapter follows it

    def _set_setup(self, names: list[str], block: Block | None) -> None:
        """Activate a parsed setup; on a lowering error the previous setup stays active."""
        before = (self._active, self._setup)
        self._active, self._setup = names, block
        try:
            self._relower()
        except BaseException:
            self._active, self._setup = before
            self._relower()
            raise

    @property
    def active_adapters(self) -> list[str] | AdapterCompositionBlock | None:
        """The active composition block (fxadapt.blocks) as it was set, or the list of active adapter names."""
        if self._setup is not None:
            return from_json(self._setup)
        return list(self._active) or None

    @active_adapters.setter
    def active_adapters(self, adapter_setup: Any) -> None:
        self.set_active_adapters(adapter_setup)

    @property
    def adapters(self) -> dict[str, AdapterDef]:
        return dict(self._adapters)

    def adapter_modules(self, adapter_name: str) -> list[nn.Module]:
        return [getattr(self, REGISTRY)[slug(adapter_name)][p.module_path.rpartition(".")[2]]
                for p in self._placements[adapter_name]]

    # -- forward -------------------------------------------------------------------------------------------
    def _input_names(self) -> list[str]:
        """The lowered graph's inputs: the captured ones, plus `task_ids` under a MultiTask setup."""
        extra = ["task_ids"] if multi_task_children(self._composed) else []
        return [*self.captured.input_names, *extra]

    def _check_setup_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        """Split / BatchSplit sizes must add up to the sequence length / batch size (the reference raises too)."""
        first = next(iter(inputs.values()))
        try:
            check_sizes(self._composed, first.shape[0], first.shape[1] if first.dim() > 1 else None)
        except UserError as exc:
            raise UserError(f"forward: {exc}") from None

    def _inputs(self, given: dict[str, Any]) -> dict[str, torch.Tensor]:
        names = self._input_names()
        inputs = {k: v for k, v in given.items() if v is not None}
        extra = [k for k in inputs if k not in names]
        for key in extra:
            # The model's default token types are zeros: an all-zero tensor changes nothing.
            if key == "token_type_ids" and isinstance(inputs[key], torch.Tensor) and not inputs[key].any():
                del inputs[key]
        extra = [k for k in inputs if k not in names]
        missing = [k for k in names if k not in inputs]
        if missing == ["task_ids"] and not extra:
            raise UserError("forward: the active MultiTask setup needs task_ids, one child index per row of the "
                            "batch (as in the reference).")
        if extra or missing:
            raise UserError(f"forward: the model was captured with inputs {', '.join(names)}; "
                            + (f"got unexpected {', '.join(extra)}" if extra else f"missing {', '.join(missing)}")
                            + ". Pass example_inputs with these inputs to fxadapt.adapt() to capture others.")
        return {k: inputs[k] for k in names}

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                pixel_values=None, decoder_input_ids=None, labels=None, return_dict: bool | None = None,
                num_items_in_batch=None, **kwargs):
        given = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, pixel_values=pixel_values, decoder_input_ids=decoder_input_ids,
                     **kwargs)
        inputs = self._inputs(given)
        if self._composed is not None:
            self._check_setup_inputs(inputs)
        outputs = self._lowered_graph(**inputs)
        if self.active_head is not None:
            head = self.heads[self.active_head]
            logits = head.logits(outputs["last_hidden_state"])
            loss = head.loss(logits, labels) if labels is not None else None
            outputs = SequenceClassifierOutput(loss=loss, logits=logits)
        elif labels is not None:
            loss = task_loss(self._loss_type, outputs, labels, self.config, num_items_in_batch)
            outputs = type(outputs)(loss=loss, **outputs)
        return outputs.to_tuple() if return_dict is False else outputs

    def adapter_summary(self, as_dict: bool = False) -> str | list[dict[str, Any]]:
        entries = {n: (self._adapters[n].method.NAME if n not in self._merged else "merged " +
                       self._adapters[n].method.NAME, self.adapter_modules(n)) for n in self._adapters}
        entries.update({f"fusion {n}": ("fusion", self._fusion_modules(n)) for n in self._fusions})
        entries.update({f"head {n}": ("classification", [h]) for n, h in self.heads.items()})
        active = self._active + [f"fusion {n}" for n in _fusion_names(self._composed)]
        table = summary.rows(entries, active + ([f"head {self.active_head}"] if self.active_head else []),
                             summary.count([self.base]), summary.trainable([self.base]))
        return table if as_dict else summary.render(table)

    # -- deployment ----------------------------------------------------------------------------------------
    def _spec(self, merge_lora: bool) -> Spec:
        setup = self._composed
        fusions = [self._fusions[n] for n in sorted(_fusion_names(setup))]
        return Spec({n: self._adapters[n] for n in self._active}, list(self._active), {"merge_lora": merge_lora},
                    setup, fusions)

    def compile(self, output_dir: str | Path, formats: tuple[str, ...] = ("onnx",), merge_lora: bool = True,
                atol: float = 1e-4, rtol: float = 1e-4, progress=lambda _: None, debug: bool | None = None):
        """The CLI's artifacts for the current setup: OUT/model.onnx (etc., verified) and OUT/report.json.
        `debug` (default: FXADAPT_DEBUG=1) checks the outputs after every optimization pass."""
        head = self.heads[self.active_head] if self.active_head else None
        with _evaluating(self):
            return exporting.compile_adapted(self.captured, self._fresh(), head, self._spec(merge_lora),
                                             Path(output_dir), tuple(formats), (atol, rtol), progress, self._composed,
                                             debug)

    def export(self, merge_lora: bool = True) -> torch.export.ExportedProgram:
        """The current setup, optimized, as a torch.export ExportedProgram (e.g. for AOTInductor)."""
        head = self.heads[self.active_head] if self.active_head else None
        with _evaluating(self):
            return exporting.export_adapted(self.captured, self._fresh(), head, merge_lora, self._composed)


class _evaluating:
    """Eval mode for the duration of a block (artifacts are inference graphs), then the previous mode."""

    def __init__(self, model: AdaptedModel) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was)


__all__ = ["AdaptedModel", "adapt"]
