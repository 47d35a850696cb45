"""Swappable adapters: one ONNX model whose adapter tensors are graph inputs, and one adapter file per adapter.

    y = f(x; W_base, θ_1, ..., θ_N)        every adapter of the spec inserted (`rewrite`), merge_lora off
    file_k:  θ_k = adapter k's weights,  θ_j = I_j for j != k     (I_j: values with which adapter j is the identity)

Adapters of one kind at the same sites share one slot (export/slots.py): compiled once at their largest rank /
bottleneck size with scaling 1, each file filling it zero-padded with its adapter's scaling folded in, so the
model's adapter cost grows with the number of kinds, not adapters. Identity values: zeros (a LoRA / VeRA update
B·A x = 0, a bottleneck's up-projection 0, so the adapter adds 0 to its residual stream, a ReFT intervention
R = W = 0), 1/alpha for (IA)^3's scale vector l (1 in a shared slot), for DoRA B = 0 with the magnitude
m = ||W||_row of the base weight (m / ||W + 0|| ⊙ y = y), and for a prefix slot its mask over every prefix position
(methods/prefix_tuning/slot.py: masked keys get softmax weight 0, so the attention is the model's own). Which
adapters share a slot, how they pad and fold, and why some are refused: each method's SlotRule (`method.SLOT`,
methods/slot_rule.py); this module never switches on method names. The graph inputs carry the spec's active adapter as
defaults (an ONNX initializer named like a graph input is that input's default), so a plain session runs as the
spec says; ONNX Runtime's `RunOptions.add_active_adapter` replaces them for one run. The compile checks every
file: ONNX Runtime with file k must give the outputs of a compile of adapter k alone (an adapter whose zeros are
not the identity, e.g. a LayerNorm after its residual add, fails there and the compile exits 3).

Not swappable (refused with the reason): what a method's SlotRule refuses (prompt tuning: a prompt lengthens the
sequence; gated prefixes and (IA)^3; prefixes in unions; a second prefix slot, `_check_one_slot`), PEFT checkpoints
that change base weights, composition blocks and fusions in the spec, bottleneck adapters that could not share a
residual site exactly (`_check_residual_layouts`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .. import pass_list
from ..capture import Captured, exportable_masks, flatten_outputs
from ..composition import parse_composition
from ..errors import UserError
from ..methods.slot_rule import rule_of
from ..pass_list import OPTIMIZE, Check, Context
from ..spec import AdapterDef, Spec
from .adapter_files import (
    ADAPTERS_DIR,
    SUFFIX,
    Layout,
    Tensor,
    write_adapter_file,
    write_layout,
)
from .prepare import for_export
from .slots import Slots, fill_value, folded, group, identity_value, pad

KEPT_PASSES = ("eliminate_dead_code",)  # the optimization passes a swappable model runs


@dataclass
class Plan:
    """The adapter tensors of the swappable graph: their layout, every adapter's values for its slot's tensors
    ({adapter: {tensor: value}}), identity values."""

    layout: Layout
    values: dict[str, dict[str, torch.Tensor]]
    identity: dict[str, torch.Tensor]

    def file_values(self, adapter: str) -> dict[str, np.ndarray]:
        """What the file of `adapter` holds: its values in its slot's tensors, the identity in every other."""
        slot, own = self.layout.slot_of(adapter), self.values.get(adapter, {})
        return {t.name: _numpy(own[t.name] if t.adapter == slot else self.identity[t.name])
                for t in self.layout.tensors}


def swappable_spec(spec: Spec) -> Spec:
    """The spec compiled for --swappable: all its adapters active (the active one first), merge_lora off."""
    if spec.setup is not None or len(spec.active) != 1:
        raise UserError("--swappable: \"active\" must name one adapter (the default of the model); composition "
                        "blocks are not swappable yet. List the other adapters under \"adapters\".")
    if spec.fusions:
        raise UserError("--swappable: AdapterFusion is not swappable yet; remove \"fusions\" from the spec.")
    for name, adapter in spec.adapters.items():
        reason = refusal(adapter)
        if reason:
            raise UserError(f"{adapter.path}: adapter {name!r} ({adapter.method.NAME}) is not swappable: {reason}. "
                            "Compile it without --swappable, or leave it out of the spec.")
    slots = group(spec)
    _check_one_slot(spec, slots)
    first = slots.of[spec.active[0]]
    names = [first] + [n for n in slots.compiled if n != first]
    compiled = Spec(slots.compiled, names, spec.optimize)
    _check_residual_layouts(compiled, names, slots.members)
    # No composition block: insert_adapters emits each adapter in turn at its own sites (a Stack would feed one
    # LoRA's update into the next one's input). Optimization passes off but dead-code elimination: merge_lora
    # would bake one adapter into the weights, and passes that fuse adapter modules (fuse_parallel_branches)
    # rename the tensors the adapter files are keyed by.
    optimize = {**spec.optimize, **{step.name: False for step in OPTIMIZE if step.name not in KEPT_PASSES}}
    return Spec(slots.compiled, names, optimize)


def rewrite(gm: fx.GraphModule, context: Context, check: Check | None = None) -> tuple[fx.GraphModule, dict[str, int]]:
    """pass_list.rewrite for a swappable spec, in two parts: every adapter but the bottlenecks inserted in turn at
    its own sites (several LoRA-family adapters at one projection add up, y + Σ s·B·A·x; a Stack would feed one
    update into the next one's input), then the bottleneck adapters in one Stack (several at one residual site
    compose only through their composed site; with the others' up-projections 0 a Stack is exact)."""
    spec = context.spec
    assert spec is not None
    residual = [n for n in spec.active if rule_of(spec.adapters[n].method).stacked]
    others = [n for n in spec.active if n not in residual]
    parts = []
    if len(residual) == 1 or others:
        parts.append(Spec(spec.adapters, others + residual if len(residual) == 1 else others, spec.optimize))
    if len(residual) > 1:
        stack = parse_composition({"stack": residual}, set(residual))
        parts.append(Spec(spec.adapters, residual, spec.optimize, stack))
    counts: dict[str, int] = {}
    placements: list = []
    for part in parts:
        gm, done = pass_list.rewrite(gm, replace(context, spec=part), check)
        placements += gm.meta.get("fxadapt", {}).get("placements", [])
        for name, count in done.items():
            counts[name] = counts.get(name, 0) + count
    gm.meta.setdefault("fxadapt", {})["placements"] = placements
    return gm, counts


def _check_one_slot(spec: Spec, slots: Slots) -> None:
    """Methods whose rule allows one slot per model (`SlotRule.one_slot`): adapters of theirs in two slots."""
    by_method: dict[str, list[str]] = {}
    for slot, definition in slots.compiled.items():
        if rule_of(definition.method).one_slot:
            by_method.setdefault(definition.method.NAME, []).append(slot)
    for method, taken in by_method.items():
        if len(taken) > 1:
            groups = "; ".join(", ".join(slots.members[s]) for s in taken)
            reason = rule_of(slots.compiled[taken[0]].method).one_slot
            raise UserError(f"--swappable: the {method} adapters {groups} need {len(taken)} slots (their configs "
                            f"differ beyond size): {reason}. Compile one model per group, or align their configs.")


def _check_residual_layouts(spec: Spec, names: list[str], members: dict[str, list[str]]) -> None:
    """Bottleneck slots share their residual sites through one Stack, and a Stack's LayerNorm handling comes
    from its first and last adapters: with the others at zero it is exact only where all handle it alike.
    (`members`: the adapters of each slot, for the messages.)"""

    def shown(slots: list[str]) -> str:
        return ", ".join(n for slot in slots for n in members.get(slot, [slot]))

    layouts: dict[tuple, list[str]] = {}
    fields: dict[tuple, tuple[str, ...]] = {}
    for name in names:
        adapter = spec.adapters[name]
        rule = rule_of(adapter.method)
        if rule.stacked:
            layout = (adapter.method.NAME, *(getattr(adapter.config, f, None) for f in rule.layout))
            layouts.setdefault(layout, []).append(name)
            fields[layout] = rule.layout
    unions = [n for n in names if any(rule_of(m).stacked for m, _ in getattr(spec.adapters[n].config, "members", []))]
    if unions and len(unions) + sum(map(len, layouts.values())) > 1:
        raise UserError(f"--swappable: the config union(s) {shown(unions)} hold a bottleneck adapter, which "
                        "cannot share its residual sites with other bottleneck adapters in one swappable model yet; "
                        "compile them into separate models.")
    if len(layouts) > 1:
        groups = "; ".join(f"{shown(group)}: {dict(zip(fields[layout], layout[1:], strict=True))}"
                           for layout, group in layouts.items())
        raise UserError(f"--swappable: bottleneck adapters that handle the residual and LayerNorm differently ("
                        f"{groups}) cannot share one swappable model yet; compile one model per group.")
    parallel = [n for layout, group in layouts.items() if dict(zip(fields[layout], layout[1:], strict=True)).get(
        "is_parallel") for n in group]
    if parallel and sum(map(len, layouts.values())) > 1:
        raise UserError(f"--swappable: parallel bottleneck adapters ({shown(parallel)}) cannot share their "
                        "residual sites with other bottleneck adapters in one swappable model yet (a Stack feeds one "
                        "into the next); compile them into separate models.")


def single_spec(spec: Spec, name: str) -> Spec:
    """The spec of one adapter alone: what its adapter file must reproduce."""
    return Spec({name: spec.adapters[name]}, [name], dict(spec.optimize))


def refusal(adapter: AdapterDef) -> str | None:
    """Why an adapter cannot be swapped, or None (its method's SlotRule decides; a union's, its members')."""
    reason = rule_of(adapter.method).refusal(adapter.config)
    if reason:
        return reason
    for member, config in getattr(adapter.config, "members", []):  # a config union: as its members
        rule = rule_of(member)
        reason = rule.refusal(config) or rule.in_union
        if reason:
            return f"its {member.NAME} member: {reason}"
    return None


def plan(gm: fx.GraphModule, spec: Spec, captured: Captured, slots: Slots) -> Plan:
    """Every adapter tensor of the compiled swappable graph, from its placements (in graph order); the values
    are filled per adapter by `prepare`."""
    meta = gm.meta.get("fxadapt", {})
    if meta.get("overridden"):
        raise UserError(f"--swappable: a PEFT checkpoint changes base weights ({meta['overridden'][0]}, its "
                        "`bias` setting); the base model is shared by all adapters, so it is not swappable.")
    tensors: list[Tensor] = []
    identity: dict[str, torch.Tensor] = {}
    for placement in meta.get("placements", []):
        module = gm.get_submodule(placement.module_path)
        for key, tensor in module.state_dict().items():
            name = f"{placement.module_path}.{key}"
            if name in identity:  # a module shared by several placements
                continue
            identity[name] = identity_value(gm, placement.module_path, module, key, tensor.detach())
            fill = fill_value(identity[name])
            varying = tuple(float(v) for v in identity[name].flatten()) if bool((identity[name] != fill).any()) else ()
            chunks = getattr(module, "chunks", ()) if key == "lora_A" else ()
            tensors.append(Tensor(name, tuple(tensor.shape), str(_numpy(tensor).dtype), placement.adapter,
                                  placement.reference_module, key, fill, varying, max(sum(chunks), 1)))
    adapters = {name: {"method": a.method.NAME, "format": rule_of(a.method).checkpoint,
                       "config": a.config.to_dict(), "file": f"{ADAPTERS_DIR}/{name}{SUFFIX}", "slot": slots.of[name]}
                for name, a in spec.adapters.items()}
    slot_info = {slot: {"method": a.method.NAME, "config": a.config.to_dict(), "shared": slot in slots.shared}
                 for slot, a in slots.compiled.items()}
    layout = Layout(tensors, str(captured.info.get("class", "")), adapters, spec.active[0],
                    str(captured.info.get("base_model_prefix", "")), slot_info)
    return Plan(layout, {}, identity)


def load_values(gm: fx.GraphModule, values: dict[str, np.ndarray]) -> None:
    """Copy `values` into the graph's adapter tensors (in place)."""
    with torch.no_grad():
        for name, value in values.items():
            owner, _, leaf = name.rpartition(".")
            getattr(gm.get_submodule(owner), leaf).copy_(torch.from_numpy(np.asarray(value)))


class _Lifted(nn.Module):
    """The graph with its adapter tensors as inputs: torch.export sees them as user inputs, not constants."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, inputs: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> Any:
        return torch.func.functional_call(self.gm, tensors, args=(), kwargs=inputs, strict=False)


def export_onnx(gm: fx.GraphModule, captured: Captured, plan: Plan, path: Path) -> dict[str, Any]:
    """Write the swappable ONNX model: the model's inputs, then one input per adapter tensor, each with the
    graph's current value (the active adapter) as its default. Tensors the exporter pruned as unused leave
    the layout. Returns {"nodes", "adapter_inputs", "decomposed"}."""
    import onnx  # heavy, and only the ONNX format needs it
    from onnx import numpy_helper  # (part of onnx, same reason)

    graph = for_export(gm)[0]
    inputs = dict(captured.example_inputs)
    tensors = {t.name: _current(gm, t.name) for t in plan.layout.tensors}
    dims = ({k: captured.dynamic_shapes.get(k) for k in inputs}, {n: None for n in tensors})
    try:
        with exportable_masks():
            ep = torch.export.export(_Lifted(graph), (inputs, tensors), dynamic_shapes=dims, strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--swappable: torch.export could not capture the graph with adapter inputs: {first}") \
            from exc
    names = list(inputs) + list(tensors)
    decomposed = False
    try:
        program = _to_onnx(ep, names, captured.output_names)
    except torch.onnx.errors.OnnxExporterError:
        decomposed = True  # as export/onnx.py: the slower route, only where the direct one fails
        program = _to_onnx(ep.run_decompositions(), names, captured.output_names)
    model = program.model_proto
    present = {i.name for i in model.graph.input}
    plan.layout.tensors = [t for t in plan.layout.tensors if t.name in present]
    for t in plan.layout.tensors:
        model.graph.initializer.append(numpy_helper.from_array(_numpy(tensors[t.name]), t.name))
    tmp = path.with_name(path.name + ".tmp")
    try:
        onnx.save(model, str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"nodes": len(model.graph.node), "adapter_inputs": len(plan.layout.tensors), "decomposed": decomposed,
            "swappable": True}


def _to_onnx(ep: torch.export.ExportedProgram, input_names: list[str], output_names: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(ep, (), dynamo=True, input_names=input_names, output_names=output_names,
                                 verbose=False, external_data=False)


def write_files(plan: Plan, out: Path) -> dict[str, str]:
    """OUT/adapters/layout.json and OUT/adapters/<name>.onnx_adapter for every adapter; {name: relative path}."""
    write_layout(plan.layout, out)
    files = {}
    for name in plan.layout.adapters:
        relative = f"{ADAPTERS_DIR}/{name}{SUFFIX}"
        write_adapter_file(out / relative, plan.layout, plan.file_values(name))
        files[name] = relative
    return files


def onnx_runner(model: Path) -> Callable[[dict[str, torch.Tensor], Path | None], list[np.ndarray]]:
    """Runs `model` in one ONNX Runtime session, with an adapter file activated per run (None: the defaults)."""
    import onnxruntime as ort  # heavy native runtime, loaded only to verify

    options = ort.SessionOptions()
    options.log_severity_level = 3  # adapter inputs with defaults make ORT warn that they are not constants
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feed_names = {i.name for i in session.get_inputs()}

    def run(inputs: dict[str, torch.Tensor], adapter_file: Path | None) -> list[np.ndarray]:
        run_options = ort.RunOptions()
        if adapter_file is not None:
            adapter = ort.LoraAdapter()
            adapter.Load(str(adapter_file))
            run_options.add_active_adapter(adapter)
        return session.run(None, {k: v.numpy() for k, v in inputs.items() if k in feed_names}, run_options)

    return run


def _current(gm: fx.GraphModule, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(gm.get_submodule(owner), leaf).detach().clone()


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


def prepare(gm: fx.GraphModule, captured: Captured, spec: Spec, build_one: Callable[[Spec], fx.GraphModule],
            shapes: list[tuple[str, dict[str, torch.Tensor]]]) -> tuple[Plan, dict[str, dict[str, list]]]:
    """The plan of the compiled swappable graph `gm`, with every adapter's values taken from a compile of that
    adapter alone (`build_one`: so a fresh adapter gets the initial values a plain compile gives it) and that
    compile's outputs on `shapes` (what its adapter file must reproduce); `gm` is left holding the active
    adapter's file values, the model's defaults. Returns (plan, {adapter: {shape: outputs}})."""
    _check_all_act(gm)
    slots = group(spec)
    result = plan(gm, spec, captured, slots)
    references = {}
    for name in spec.adapters:
        single = build_one(single_spec(spec, name))
        _adopt(result, spec.adapters[name], single, slots.of[name] in slots.shared)
        with torch.no_grad():
            references[name] = {shape: flatten_outputs(single(**inputs)) for shape, inputs in shapes}
    load_values(gm, result.file_values(spec.active[0]))
    return result, references


def _check_all_act(gm: fx.GraphModule) -> None:
    """Every adapter's modules must still reach the outputs: two adapters of one family at one site can bypass
    each other's nodes where only a composition block would combine them."""
    with warnings.catch_warnings():  # torch's own pytree specs warn about their deprecated LeafSpec on copy
        warnings.simplefilter("ignore", FutureWarning)
        live = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # nodes copied, modules shared: which calls are live
    live.graph.eliminate_dead_code()
    targets = {n.target for n in live.graph.nodes if n.op in ("call_module", "get_attr")}
    def used(path: str) -> bool:  # called itself, inside a composed module, or through its own submodules
        return any(path == t or path.startswith(t + ".") or t.startswith(path + ".") for t in targets)

    idle = sorted({p.adapter for p in gm.meta.get("fxadapt", {}).get("placements", []) if not used(p.module_path)})
    if idle:
        raise UserError(f"--swappable: adapter(s) {', '.join(idle)} share their sites with other adapters of their "
                        "family in a way one swappable model cannot hold yet; compile them into separate models.")


def _adopt(plan: Plan, adapter: AdapterDef, single: fx.GraphModule, shared: bool) -> None:
    """Take the adapter's values from its own compile: tensors match by checkpoint location (module, key); in a
    shared slot zero-padded to the slot's size, the adapter's scaling folded into its B / up tensors (slots.py)."""
    own = {}
    for placement in single.meta.get("fxadapt", {}).get("placements", []):
        for key, tensor in single.get_submodule(placement.module_path).state_dict().items():
            own[(placement.reference_module, key)] = tensor.detach().clone()
    slot, rule = plan.layout.slot_of(adapter.name), rule_of(adapter.method)
    values = plan.values.setdefault(adapter.name, {})
    for tensor in plan.layout.tensors:
        if tensor.adapter != slot:
            continue
        derived = rule.derived(adapter.config, tensor.key, tensor.shape)  # not the adapter's own (a prefix mask)
        if derived is not None:
            values[tensor.name] = torch.from_numpy(np.asarray(derived, dtype=tensor.dtype))
            continue
        value = own.get((tensor.module, tensor.key))
        if value is not None and shared:
            padded = pad(_numpy(value), tensor.shape, tensor.blocks)
            if padded is not None:
                padded = folded(adapter.method, adapter.config, tensor.module, tensor.key, padded)
            value = None if padded is None else torch.from_numpy(padded)
        if value is None or tuple(value.shape) != tensor.shape:
            raise RuntimeError(f"swappable: adapter {adapter.name!r} compiled alone has no {tensor.module}."
                               f"{tensor.key} that fits {tensor.shape}")
        values[tensor.name] = value
