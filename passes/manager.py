"""Run an ordered list of graph passes, lint after each, and count what each changed.

A pass is `GraphModule -> PassResult`. After every pass the graph is linted and recompiled; an
optional `check(gm, name)` runs too (debug mode's checks, fxadapt/pass_checks.py). A failure names the
pass and the passes that ran before it. The list itself lives in fxadapt/pass_list.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    count: int  # rewrites made; 0 means the pass changed nothing

    @property
    def modified(self) -> bool:
        return self.count > 0


Pass = Callable[[fx.GraphModule], PassResult]


class PassError(RuntimeError):
    """A pass left the graph invalid or failed its check."""


def run_passes(gm: fx.GraphModule, passes: list[tuple[str, Pass]],
               check: Callable[[fx.GraphModule, str], None] | None = None) -> tuple[fx.GraphModule, dict[str, int]]:
    counts: dict[str, int] = {}
    for name, run in passes:
        result = run(gm)
        gm = result.graph_module
        before = ", ".join(counts) or "none"
        try:
            gm.graph.lint()
            gm.recompile()
        except Exception as exc:
            raise PassError(f"pass {name!r} left an invalid graph (passes before it: {before}): {exc}") from exc
        if check is not None:
            try:
                check(gm, name)
            except Exception as exc:
                # Keep the check's own error class (e.g. OutputsChanged), so callers can tell the failures apart.
                kind = type(exc) if isinstance(exc, PassError) else PassError
                raise kind(f"pass {name!r} failed the check after it (passes before it: {before}): {exc}") from exc
        counts[name] = result.count
    return gm, counts
