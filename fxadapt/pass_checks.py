"""Debug mode's checks after every pass (`fxadapt compile --debug`, FXADAPT_DEBUG=1).

Rewrite passes change the outputs on purpose (they define the reference), so after each of them the
graph only has to run. Optimize passes must keep the outputs within float rounding of the reference
taken before optimization; the first one that does not is named, with its error per output.
"""

from __future__ import annotations

import torch
from torch import fx

from .capture import flatten_outputs
from .export.verify import compare
from .passes.manager import PassError


class OutputsChanged(PassError):
    """An optimization pass changed the graph's outputs beyond the tolerance."""


def graph_runs(inputs: dict[str, torch.Tensor]):
    """A check that the graph still runs on `inputs` (after a rewrite pass)."""

    def check(gm: fx.GraphModule, name: str) -> None:
        with torch.no_grad():
            gm(**inputs)

    return check


def outputs_unchanged(shapes: list[tuple[str, dict[str, torch.Tensor]]], references: dict[str, list[torch.Tensor]],
                      output_names: list[str], tolerance: tuple[float, float]):
    """A check that the graph's outputs on every shape still match `references` (taken before optimization)
    within max|a - r| <= atol + rtol * max|r|, the rule the artifacts are verified by."""
    atol, rtol = tolerance

    def check(gm: fx.GraphModule, name: str) -> None:
        for shape, inputs in shapes:
            with torch.no_grad():
                actual = flatten_outputs(gm(**inputs))
            bad = [e for e in compare(output_names, references[shape], actual, atol, rtol) if not e.ok]
            if bad:
                worst = ", ".join(f"{e.name} max abs {e.max_abs:.2e} (rel {e.max_rel:.2e})" for e in bad)
                raise OutputsChanged(f"debug mode: optimization pass {name!r} changed the outputs on shape {shape}: "
                                     f"{worst}; allowed atol {atol:g} + rtol {rtol:g} * max|reference| against the "
                                     "outputs before optimization. Optimization passes must keep the numbers.")

    return check
