"""The one ordered list of graph passes; the CLI (fxadapt/pipeline.py) and the Python API
(fxadapt/lifecycle/lowering.py, exporting.py) both run it through `rewrite` and `optimize` below.

    REWRITE    insert_adapters -> lower_composition                 define the reference outputs
    -- the eager reference outputs are taken here, before any optimization --
    OPTIMIZE   merge_lora -> fold_fusion -> fuse_parallel_branches -> route_rows -> eliminate_dead_code
               keep the outputs within float rounding

A pass that does not apply to a spec (insert_adapters under a composition setup, lower_composition
without one, merge_lora switched off by `"optimize": {"merge_lora": false}`) is skipped: report.json's
"passes" lists the passes that ran, each with the number of nodes it inserted, rewrote or removed.
Each pass's contract is in passes/README.md. Debug mode (`fxadapt compile --debug`, FXADAPT_DEBUG=1)
checks after every pass (fxadapt/pass_checks.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx

from .composition import multi_task_children
from .passes.cleanup import eliminate_dead_code
from .passes.fold_fusion import fold_fusion
from .passes.fuse_parallel import fuse_parallel_branches
from .passes.insert_adapters import insert_adapters
from .passes.lower_composition import lower_composition
from .passes.manager import PassResult, run_passes
from .passes.merge_lora import merge_lora
from .passes.route_rows import route_rows
from .sites import SiteMap
from .spec import Spec

DEBUG_ENV = "FXADAPT_DEBUG"


@dataclass
class Context:
    """What the passes read besides the graph: the spec, the model's sites and facts the checkpoint loaders need."""

    spec: Spec | None = None  # rewrite passes only (optimize passes read `options`, else spec.optimize)
    sites: SiteMap | None = None  # rewrite passes only
    base_prefix: str = ""  # the base model's attribute prefix (`bert.`), optional in checkpoint keys
    hidden_size: int | None = None
    options: dict[str, bool] = field(default_factory=dict)  # overrides of spec.optimize

    def enabled(self, option: str) -> bool:
        default = self.spec.optimize.get(option, True) if self.spec is not None else True
        return self.options.get(option, default)


@dataclass(frozen=True)
class Step:
    """One entry of the list: a pass, under its report name, and when it applies."""

    name: str
    run: Callable[[fx.GraphModule, Context], PassResult]
    applies: Callable[[Context], bool] = lambda _: True


def _single(gm: fx.GraphModule, ctx: Context) -> PassResult:
    assert ctx.spec is not None and ctx.sites is not None, "rewrite passes need the spec and the model's sites"
    return insert_adapters(gm, ctx.spec, ctx.sites, ctx.base_prefix, ctx.hidden_size)


def _composed(gm: fx.GraphModule, ctx: Context) -> PassResult:
    assert ctx.spec is not None and ctx.sites is not None, "rewrite passes need the spec and the model's sites"
    return lower_composition(gm, ctx.spec, ctx.sites, ctx.base_prefix, ctx.hidden_size)


REWRITE: list[Step] = [
    # The active adapters of a spec without a composition block: each method emits its own nodes.
    Step("insert_adapters", _single, lambda ctx: ctx.spec is not None and ctx.spec.setup is None),
    # A composition block (Stack, Fuse, ...): one composed module per site holds all the setup's adapters, so
    # it replaces insert_adapters rather than following it (the two never insert into the same graph).
    Step("lower_composition", _composed, lambda ctx: ctx.spec is not None and ctx.spec.setup is not None),
]

OPTIMIZE: list[Step] = [
    # First: it folds the LoRA-family modules the rewrite passes inserted, which later passes then see as dead.
    Step("merge_lora", lambda gm, ctx: merge_lora(gm), lambda ctx: ctx.enabled("merge_lora")),
    # AdapterFusion folded into its adapters' up-projections. It recognises composed bottleneck sites by class and
    # replaces them (same path), so it runs before any pass that rewrites or replaces those sites; it applies to
    # specs with fusions (or when `options` asks for it: the Python API's Context has no spec).
    Step("fold_fusion", lambda gm, ctx: fold_fusion(gm), lambda ctx: ctx.enabled("fold_fusion") and (
        bool(ctx.spec.fusions) if ctx.spec is not None else "fold_fusion" in ctx.options)),
    # LoRA updates that read one tensor -> one GEMM for their A's (siblings q/k/v, gate/up; an Average of LoRAs at
    # a site). Only with merge_lora off: merging leaves nothing to fuse and a merged weight is cheaper still, and
    # what merge_lora refused must stay unmerged modules for merge_adapter's error (lifecycle/lowering.py).
    # Independent of fold_fusion and route_rows: it leaves bottleneck and multi_task sites alone.
    Step("fuse_parallel_branches", lambda gm, ctx: fuse_parallel_branches(gm),
         lambda ctx: ctx.enabled("fuse_parallel_branches") and not ctx.enabled("merge_lora")),
    # multi_task sites of single adapters -> stacked weights gathered per row. merge_lora leaves composed sites
    # alone (they are no FamilyModule), so the two never touch the same node; after fold_fusion, which must see
    # composed bottleneck sites as lowered; before eliminate_dead_code, which drops the replaced sites and the
    # shared get_attr nodes (VeRA, Compacter) only they read. Applies to setups with a multi_task block (or when
    # `options` asks for it: the Python API's Context has no spec).
    Step("route_rows", lambda gm, ctx: route_rows(gm), lambda ctx: ctx.enabled("route_rows") and (
        multi_task_children(ctx.spec.setup) > 0 if ctx.spec is not None else "route_rows" in ctx.options)),
    # Last: it removes what the passes before it left unused (merged LoRA modules, a replaced add + LayerNorm).
    Step("eliminate_dead_code", lambda gm, ctx: eliminate_dead_code(gm)),
]

Check = Callable[[fx.GraphModule, str], None]


def _run(gm: fx.GraphModule, steps: list[Step], ctx: Context, check: Check | None
         ) -> tuple[fx.GraphModule, dict[str, int]]:
    chosen = [(s.name, _bound(s, ctx)) for s in steps if s.applies(ctx)]
    return run_passes(gm, chosen, check=check)


def _bound(step: Step, ctx: Context) -> Callable[[fx.GraphModule], PassResult]:
    return lambda gm: step.run(gm, ctx)


def rewrite(gm: fx.GraphModule, ctx: Context, check: Check | None = None) -> tuple[fx.GraphModule, dict[str, int]]:
    """The REWRITE passes that apply to `ctx.spec`, in order; returns the graph and {pass: count}."""
    return _run(gm, REWRITE, ctx, check)


def optimize(gm: fx.GraphModule, ctx: Context, check: Check | None = None) -> tuple[fx.GraphModule, dict[str, int]]:
    """The OPTIMIZE passes that apply, in order; `check` (debug mode) compares outputs after each."""
    return _run(gm, OPTIMIZE, ctx, check)


def optimize_names(ctx: Context) -> list[str]:
    """The OPTIMIZE passes that will run, for progress messages."""
    return [s.name for s in OPTIMIZE if s.applies(ctx)]


def debug_enabled(flag: bool | None = None) -> bool:
    """Debug mode: asked for explicitly (`--debug`, compile(debug=True)) or by FXADAPT_DEBUG=1."""
    return bool(flag) if flag is not None else os.environ.get(DEBUG_ENV) == "1"
