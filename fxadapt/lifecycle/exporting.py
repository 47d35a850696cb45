"""AdaptedModel.compile / export: the current adapter setup, lowered afresh in eval mode, through the CLI's
pipeline (fxadapt.pipeline): optimize (merge_lora, DCE) -> re-export -> ONNX / TorchScript / .pt2 + report.json.

With an active flex head the exported model is `logits = head(graph(inputs).last_hidden_state[:, 0])`:
the graph is optimized first (merge_lora needs the adapter modules as call_module nodes), then re-captured
together with the head, so the artifact holds both.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path

import torch
from torch import fx, nn

from ..capture import Captured, export_program
from ..passes.cleanup import eliminate_dead_code
from ..passes.manager import run_passes
from ..passes.merge_lora import merge_lora
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
    passes = ([("merge_lora", merge_lora)] if merge else []) + [("eliminate_dead_code", eliminate_dead_code)]
    return run_passes(lowered.graph, passes)


def built(captured: Captured, lowered: Lowered, head: ClassificationHead | None, merge: bool) -> tuple[Result, bool]:
    """The pipeline Result for this setup; the bool says whether the pipeline should still merge LoRA."""
    info = {f.name: getattr(captured, f.name) for f in dataclasses.fields(Captured)}
    placements = lowered.graph.meta.get("fxadapt", {}).get("placements", [])
    if head is None:
        view = LifecycleCaptured(**{**info, "module": lowered.graph})
        return Result(view, lowered.sites, lowered.graph, dict(lowered.counts)), merge
    graph, counts = _optimized(lowered, merge)
    wrapper = with_head(graph, head, captured.input_names)
    module = export_program(wrapper, captured.example_inputs, captured.dynamic_shapes).module()
    unlock_modes(module)
    module.meta["fxadapt"] = {"placements": placements}
    view = LifecycleCaptured(**{**info, "module": module, "output_names": ["logits"]})
    return Result(view, lowered.sites, module, {**lowered.counts, **counts}), False


def compile_adapted(captured: Captured, lowered: Lowered, head: ClassificationHead | None, spec: Spec,
                    out_dir: Path, formats: tuple[str, ...], tolerance: tuple[float, float], progress) -> Result:
    result, merge = built(captured, lowered, head, spec.optimize.get("merge_lora", True))
    spec = dataclasses.replace(spec, optimize={**spec.optimize, "merge_lora": merge})
    atol, rtol = tolerance
    return compile_model(captured.source, spec, Path(out_dir), tuple(formats), atol=atol, rtol=rtol,
                         progress=progress, built=result)


def export_adapted(captured: Captured, lowered: Lowered, head: ClassificationHead | None,
                   merge: bool) -> torch.export.ExportedProgram:
    """The optimized adapted model as a torch.export ExportedProgram (dynamic batch and sequence)."""
    graph, _ = _optimized(lowered, merge)
    module: nn.Module = with_head(graph, head, captured.input_names) if head is not None else graph
    return export_program(module, captured.example_inputs, captured.dynamic_shapes)
