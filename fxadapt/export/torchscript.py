"""Export a ``torch.export.ExportedProgram`` to TorchScript with its dynamic shapes intact.

Why not ``torch.jit.trace``: tracing records every size as a constant (a traced module breaks on a
new batch or sequence length) and refuses SymInts; ``torch.jit.script(ep.module())`` fails on the
unlifted module's pytree code and on ``OpOverload`` targets. So we *rewrite* the exported ATen graph
into a plain, scriptable ``fx.GraphModule`` and let ``torch.jit.script`` compile its generated code:

* user inputs become positional placeholders in ``input_names`` order; the pytree ``in_spec`` says
  which flat input each name is, so keyword and positional exports both work;
* lifted parameters, buffers and tensor constants become ``get_attr`` nodes on a root module under
  their original dotted names, so ``state_dict()`` keys match the source model;
* ``aten.sym_size.int(x, d)`` (and sym_stride/numel) becomes ``x.size(d)``, so every shape is
  re-read at run time; symbolic int arithmetic (``operator.*``, ``torch.sym_max`` ...) becomes
  plain Python int arithmetic, which TorchScript compiles;
* ``OpOverload`` targets become their ``OpOverloadPacket`` (``torch.ops.aten.view(...)``), which
  TorchScript resolves against the same ATen schemas; export keeps arguments schema-normalised, so
  resolution lands on the equivalent overload;
* runtime-only assertions (``_assert_tensor_metadata``, ``_assert_scalar`` ...) are dropped;
* device literals equal to the export device are rebound to the first input's ``.device``, so the
  saved module follows its inputs (``torch.jit.load(..., map_location="cuda")`` works);
* buffer / input mutations recorded in the graph signature become ``copy_`` calls.

Higher-order ops from ``torch.no_grad()`` / ``torch.autocast`` regions are inlined first with
``ep.run_decompositions({})`` (only when present: it re-traces the program). Anything left that
TorchScript cannot express (``torch.cond``, effect tokens, ...) raises a ``RuntimeError`` that names
the node.
"""

from __future__ import annotations

import math
import operator
import re
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind

from .prepare import plain_tree
from .reproducible import save_reproducibly

__all__ = ["export_torchscript"]

_DROPPED = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten.sym_constrain_range.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}
_STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ)
_SIZE_METHODS = {
    torch.ops.aten.sym_size.int: "size",
    torch.ops.aten.sym_stride.int: "stride",
    torch.ops.aten.sym_numel.default: "numel",
    torch.ops.aten.sym_storage_offset.default: "storage_offset",
}


def _not(a: bool) -> bool:
    return not a


def _sym_sum(xs: list[int]) -> int:
    return sum(xs)


# Symbolic-shape helpers that export emits, mapped to what TorchScript understands.
_SYM_FUNCTIONS: dict[Any, Any] = {
    torch.sym_max: max,
    torch.sym_min: min,
    torch.sym_float: float,
    torch.sym_int: int,
    torch.sym_not: _not,
    operator.not_: _not,
    math.floor: math.floor,
    math.ceil: math.ceil,
}
if hasattr(torch, "sym_sum"):
    _SYM_FUNCTIONS[torch.sym_sum] = _sym_sum


def export_torchscript(
    ep: torch.export.ExportedProgram,
    input_names: list[str],
    output_names: list[str],
    path: str | None = None,
) -> torch.jit.ScriptModule:
    """Convert ``ep`` into a ScriptModule with ``forward(*inputs in input_names order)`` returning a
    tuple of tensors in ``output_names`` order; sizes stay dynamic. Saved to ``path`` if given."""
    input_names, output_names = list(input_names), list(output_names)
    _check_names(ep, input_names, output_names)  # fail fast, before any re-tracing
    if any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in ep.graph.nodes):
        ep = ep.run_decompositions({})  # inlines no_grad / autocast wrappers
    gm, names = _scriptable_graph_module(ep, input_names, output_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sm = torch.jit.script(gm)
        except Exception as e:
            raise RuntimeError(_describe_script_error(e, names)) from e
    if path is not None:
        _atomic_save(sm, path)
    return sm


def _leaf_names(spec: pytree.TreeSpec) -> list[str | None]:
    """The key (dict key or attribute name) under which each flat leaf of ``spec`` sits, or None."""
    # Mappings are read as plain dicts: transformers 4.57 registers ModelOutput without a keys function.
    tree = plain_tree(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))
    names: list[str | None] = [None] * spec.num_leaves
    for key_path, idx in pytree.tree_flatten_with_path(tree)[0]:
        last = key_path[-1] if key_path else None
        if isinstance(last, pytree.MappingKey):
            names[idx] = str(last.key)
        elif isinstance(last, pytree.GetAttrKey):
            names[idx] = last.name
    return names


def _check_names(
    ep: torch.export.ExportedProgram, input_names: list[str], output_names: list[str]
) -> tuple[list[str], list[int]]:
    """Validate the names against the program's signature. Returns the name of each flat user input
    (keyword, else placeholder name) and, for each output name, the index of its flat output: by key
    when the program's outputs are keyed (e.g. a ModelOutput) by exactly these names, else by position."""
    placeholders = list(ep.graph_signature.user_inputs)
    in_keys = _leaf_names(ep.call_spec.in_spec)
    exported = [key or ph for key, ph in zip(in_keys, placeholders, strict=True)]
    user_specs = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    # Non-tensor inputs that export baked in as constants may be left out.
    required = [n for n, s in zip(exported, user_specs, strict=True) if not isinstance(s.arg, ConstantArgument)]
    if len(set(input_names)) != len(input_names) or not set(required) <= set(input_names) <= set(exported):
        raise RuntimeError(f"input_names {input_names} do not match the exported program's inputs {required}")
    out_keys = _leaf_names(ep.call_spec.out_spec)
    if len(output_names) != len(out_keys):
        raise RuntimeError(
            f"output_names {output_names} has {len(output_names)} names, the program {len(out_keys)} outputs"
        )
    if len(set(output_names)) == len(output_names) and set(output_names) == set(out_keys):
        return exported, [out_keys.index(name) for name in output_names]
    return exported, list(range(len(output_names)))


def _set_nested(root: nn.Module, target: str, value: Any, kind: InputKind | None, persistent: bool) -> None:
    """Install ``value`` at dotted ``target`` under ``root``, creating container modules."""
    *parents, leaf = target.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if kind == InputKind.PARAMETER:
        mod.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=False))
    elif isinstance(value, torch.Tensor):
        mod.register_buffer(leaf, value.detach(), persistent=persistent)
    else:
        setattr(mod, leaf, value)


def _script_type(val: Any) -> type | None:
    """TorchScript type annotation for an input whose example value is ``val`` (default: Tensor)."""
    for py_type, sym_type in ((bool, torch.SymBool), (int, torch.SymInt), (float, torch.SymFloat)):
        if isinstance(val, (py_type, sym_type)):
            return py_type
    return None


def _scriptable_graph_module(
    ep: torch.export.ExportedProgram, input_names: list[str], output_names: list[str]
) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """Rebuild ``ep.graph`` as a plain GraphModule TorchScript can compile. Also returns a map from
    new node names to the original nodes, for error messages."""
    sig = ep.graph_signature
    exported, out_order = _check_names(ep, input_names, output_names)
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user = [(n, s) for n, s in zip(placeholders, sig.input_specs, strict=True) if s.kind == InputKind.USER_INPUT]
    by_name = dict(zip(exported, user, strict=True))
    root, graph = nn.Module(), fx.Graph()
    new_inputs = {name: graph.placeholder(name, _script_type(by_name[name][0].meta.get("val"))) for name in input_names}
    # Inputs left out are constants export baked in; their placeholders have no users.
    env: dict[fx.Node, Any] = {
        node: new_inputs.get(name, getattr(spec.arg, "value", None)) for name, (node, spec) in by_name.items()
    }
    origin: dict[str, fx.Node] = {}
    # Device literals equal to the first tensor input's (export-time) device follow that input at run time.
    home_device = next(
        ((n.meta["val"].device, env[n]) for n, _ in user if isinstance(n.meta.get("val"), torch.Tensor)),
        None,
    )
    for node, spec in zip(placeholders, sig.input_specs, strict=True):
        if spec.kind == InputKind.USER_INPUT:
            continue
        elif spec.kind in _STATE_KINDS:
            value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            persistent = spec.kind == InputKind.BUFFER and bool(spec.persistent)
            _set_nested(root, spec.target, value, spec.kind, persistent)
            env[node] = graph.get_attr(spec.target)
        else:
            raise RuntimeError(f"cannot convert input '{node.name}' of kind {spec.kind.name} to TorchScript")

    device_node: fx.Node | None = None

    def convert_arg(a: Any) -> Any:
        nonlocal device_node
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, torch.device):
            if home_device is not None and a == home_device[0]:
                if device_node is None:
                    device_node = graph.call_function(getattr, (home_device[1], "device"))
                return device_node
            return str(a)
        return a

    for node in ep.graph.nodes:
        if node.op == "get_attr":
            value = getattr(ep.graph_module, node.target)
            if not isinstance(value, torch.Tensor):
                continue  # a HOP's subgraph; the HOP itself is rejected below
            _set_nested(root, node.target, value, None, False)
            env[node] = graph.get_attr(node.target)
            continue
        if node.op != "call_function" or node.target in _DROPPED:
            continue
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            raise RuntimeError(f"node '{node.name}': higher-order op {target.name()!r} has no TorchScript form")
        args = fx.node.map_aggregate(node.args, convert_arg)
        kwargs = fx.node.map_aggregate(node.kwargs, convert_arg)
        if target in _SIZE_METHODS:
            new = graph.call_method(_SIZE_METHODS[target], args, kwargs)
        elif isinstance(target, torch._ops.OpOverload):
            new = graph.call_function(target.overloadpacket, args, kwargs)
        else:
            target = _SYM_FUNCTIONS.get(target, target)
            _check_python_function(node, target)
            new = graph.call_function(target, args, kwargs)
        env[node] = new
        origin[new.name] = node

    (results,) = [n for n in ep.graph.nodes if n.op == "output"][0].args
    outputs = []
    for value, spec in zip(results, sig.output_specs, strict=True):
        value = fx.node.map_aggregate(value, convert_arg)
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append(value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            graph.call_method("copy_", (graph.get_attr(spec.target), value))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            graph.call_method("copy_", (new_inputs[exported[sig.user_inputs.index(spec.target)]], value))
        else:
            raise RuntimeError(f"cannot convert output of kind {spec.kind.name} to TorchScript")
    graph.output(tuple(outputs[i] for i in out_order))
    gm = fx.GraphModule(root, graph, class_name="FxadaptTorchScript")
    return gm.eval(), origin


def _check_python_function(node: fx.Node, fn: Any) -> None:
    """Builtins, ``operator`` and ``math`` functions are TorchScript builtins; compile anything else
    on its own first, so a failure names the node that calls it."""
    if getattr(fn, "__module__", None) in ("builtins", "_operator", "math", __name__):
        return
    try:
        torch.jit.script(fn)
    except Exception as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise RuntimeError(f"node '{node.name}': {fn!r} is not TorchScript-compatible: {first}") from e


def _describe_script_error(err: Exception, origin: dict[str, fx.Node]) -> str:
    """Turn a TorchScript compile error into one naming the graph node it points at."""
    text = str(err)
    lines = text.splitlines()
    summary = next((ln.strip() for ln in lines if ln.strip()), type(err).__name__)
    for i, line in enumerate(lines):
        if "<--- HERE" in line and i > 0:
            match = re.match(r"\s*(\w+) = ", lines[i - 1])
            if match and match.group(1) in origin:
                node = origin[match.group(1)]
                return f"TorchScript cannot compile node '{node.name}' (target {node.target}): {summary}"
    return f"TorchScript compilation failed: {summary}\n{text}"


def _atomic_save(sm: torch.jit.ScriptModule, path: str) -> None:
    """``torch.jit.save`` under the final name in a scratch directory, then rename: no partial file on failure,
    and the same bytes for the same module (export/reproducible.py)."""
    def save(target: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
            torch.jit.save(sm, target)

    save_reproducibly(path, save)
