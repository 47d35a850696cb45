"""AdaptedModel.compile / export: the current adapter setup, lowered afresh in eval mode, through the CLI's
pipeline (fxadapt.pipeline): optimize (pass_list.OPTIMIZE) -> re-export -> ONNX / TorchScript / .pt2 + report.json.

With an active flex head the exported model is `logits = head(graph(inputs).last_hidden_state[:, 0])`:
the graph is optimized first (merge_lora needs the adapter modules as call_module nodes), then re-captured
together with the head, so the artifact holds both.

A composition setup changes the export's inputs as in the CLI (fxadapt/pipeline.py): Split / BatchSplit
pin the sequence length / batch size (example inputs of those sizes, the dims static), Parallel bounds
the batch so that its N copies stay in range, MultiTask adds the `task_ids` input.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path

import torch
from torch import fx, nn

from .. import pass_list
from ..capture import Captured, export_program
from ..compose.fusion_spec import FUSION_METHOD
from ..composition import multi_task_children, pinned_dims, setup_dynamic_shapes
from ..pipeline import Result, compile_model
from ..spec import Spec
from .base_graph import unlock_modes
from .heads import ClassificationHead
from .lowering import Lowered


@dataclasses.dataclass
class LifecycleCaptured(Captured):
    """A capture whose verification inputs also cover inputs the CLI does not generate (token_type_ids: zeros)."""

    def inputs(self, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
        made = super().inputs(batch, seq, seed)
        for name, example in self.example_inputs.items():
            if name not in made:
                shape = (batch, seq, *example.shape[2:]) if 1 in self.dynamic_shapes.get(name, {}) else (
                    batch, *example.shape[1:])
                made[name] = torch.zeros(shape, dtype=example.dtype)
        return made


class GraphWithHead(nn.Module):
    """The adapted graph followed by a flex classification head; returns {"logits": ...}."""

    def __init__(self, graph: fx.GraphModule, head: ClassificationHead) -> None:
        super().__init__()
        self.adapted = graph  # not `graph`: the re-exported GraphModule owns that attribute name
        self.head = head

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head.logits(self.adapted(**inputs)["last_hidden_state"])}


def with_head(graph: fx.GraphModule, head: ClassificationHead, input_names: list[str]) -> GraphWithHead:
    """GraphWithHead whose forward has the named parameters torch.export binds the inputs and their dims to."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in input_names]

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return GraphWithHead.forward(self, **inputs)

    forward.__signature__ = inspect.Signature(params)
    cls = type("GraphWithHead", (GraphWithHead,), {"forward": forward})
    return cls(graph, copy.deepcopy(head)).eval()  # a copy: eval() must not touch the user's head


def _optimized(lowered: Lowered, merge: bool) -> tuple[fx.GraphModule, dict[str, int]]:
    """pass_list's OPTIMIZE passes (the CLI's), before a head is captured on top of the graph; a setup with
    AdapterFusion asks for fold_fusion, one with a MultiTask block for route_rows (its Context has no spec to tell)."""
    options = {"merge_lora": merge}
    if any(p.method == FUSION_METHOD for p in lowered.placements):
        options["fold_fusion"] = True
    if any(n.op == "placeholder" and n.name == "task_ids" for n in lowered.graph.graph.nodes):
        options["route_rows"] = True  # a MultiTask setup: its sites of single adapters gather per-row weights
    return pass_list.optimize(lowered.graph, pass_list.Context(options=options))


def _for_setup(info: dict, setup) -> dict:
    """The capture's fields with the example inputs and dynamic dims a composition setup needs (see above)."""
    if setup is None:
        return info
    info = dict(info)
    shapes = setup_dynamic_shapes(info["dynamic_shapes"], setup)
    example = dict(info["example_inputs"])
    first = next(iter(example.values()))
    pins, tasks = pinned_dims(setup), multi_task_children(setup)
    if pins:
        seq = first.shape[1] if first.dim() > 1 else 1
        example = LifecycleCaptured(**info).inputs(pins.get("batch", first.shape[0]), pins.get("seq", seq), seed=1)
        info["info"] = {**info["info"], "pinned": pins}
    if tasks:
        rows = next(iter(example.values())).shape[0]
        example["task_ids"] = torch.arange(rows) % tasks
        batch_dim = next((dims[0] for dims in shapes.values() if 0 in dims), None)
        shapes["task_ids"] = {0: batch_dim} if batch_dim is not None else {}
        info["input_names"] = [*info["input_names"], "task_ids"]
    info["example_inputs"], info["dynamic_shapes"] = example, shapes
    return info


def built(captured: Captured, lowered: Lowered, head: ClassificationHead | None, merge: bool,
          setup=None) -> tuple[Result, bool]:
    """The pipeline Result for this setup; the bool says whether the pipeline should still merge LoRA."""
    info = _for_setup({f.name: getattr(captured, f.name) for f in dataclasses.fields(Captured)}, setup)
    placements = lowered.graph.meta.get("fxadapt", {}).get("placements", [])
    if head is None:
        view = LifecycleCaptured(**{**info, "module": lowered.graph})
        return Result(view, lowered.sites, lowered.graph, dict(lowered.counts)), merge
    graph, counts = _optimized(lowered, merge)
    wrapper = with_head(graph, head, info["input_names"])
    module = export_program(wrapper, info["example_inputs"], info["dynamic_shapes"]).module()
    unlock_modes(module)
    module.meta["fxadapt"] = {"placements": placements}
    view = LifecycleCaptured(**{**info, "module": module, "output_names": ["logits"]})
    return Result(view, lowered.sites, module, {**lowered.counts, **counts}), False


def compile_adapted(captured: Captured, lowered: Lowered, head: ClassificationHead | None, spec: Spec,
                    out_dir: Path, formats: tuple[str, ...], tolerance: tuple[float, float], progress,
                    setup=None, debug: bool | None = None) -> Result:
    result, merge = built(captured, lowered, head, spec.optimize.get("merge_lora", True), setup)
    spec = dataclasses.replace(spec, optimize={**spec.optimize, "merge_lora": merge})
    atol, rtol = tolerance
    return compile_model(captured.source, spec, Path(out_dir), tuple(formats), atol=atol, rtol=rtol,
                         progress=progress, built=result, debug=debug)


def export_adapted(captured: Captured, lowered: Lowered, head: ClassificationHead | None,
                   merge: bool, setup=None) -> torch.export.ExportedProgram:
    """The optimized adapted model as a torch.export ExportedProgram (dynamic batch and sequence, unless the
    setup pins them)."""
    info = _for_setup({f.name: getattr(captured, f.name) for f in dataclasses.fields(Captured)}, setup)
    graph, _ = _optimized(lowered, merge)
    module: nn.Module = with_head(graph, head, info["input_names"]) if head is not None else graph
    return export_program(module, info["example_inputs"], info["dynamic_shapes"])
