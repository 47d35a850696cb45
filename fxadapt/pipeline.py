"""The compile pipeline: capture -> sites -> rewrite -> optimize -> verify -> export.

    capture          torch.export (non-strict), dynamic batch/sequence
    find_sites       tag attn.q/k/v/o, ffn.up/gate/down, residual sites
    rewrite          pass_list.REWRITE: insert_adapters or lower_composition (+ checkpoint weights)
    -- the eager reference outputs are taken here, before any optimization --
    optimize         pass_list.OPTIMIZE: merge_lora, eliminate_dead_code
    export           re-export the rewritten graph, then ONNX / TorchScript / .pt2, each verified
                     against the reference on the example shape and on a second shape

The pass order and the reasons for it are in fxadapt/pass_list.py (the one list, shared with the Python
API). Debug mode (`debug=True`, `--debug`, FXADAPT_DEBUG=1) checks after every pass: the graph runs after
each rewrite pass, the outputs stay within tolerance after each optimize pass (fxadapt/pass_checks.py).
`compile_model` stages its files and publishes them into OUT at the end (fxadapt/publish.py: report.json
last, symlinks replaced, one compile per OUT at a time), so a user error leaves nothing behind; a
verification failure keeps the artifacts (exit 3 from the CLI). report.json is strict JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from . import __version__, pass_checks, pass_list
from .capture import Captured, capture, export_program, flatten_outputs
from .checkpoints.bounds import allocation_bound
from .compose.task_inputs import with_task_ids
from .composition import check_sizes, multi_task_children, pinned_dims, setup_dynamic_shapes
from .errors import UserError
from .export import swappable as swap
from .export.reproducible import save_program
from .export.verify import OutputError, compare
from .publish import Publication
from .sites import SiteMap, find_sites
from .spec import Spec

FORMATS = ("onnx", "torchscript", "pt2")
OPT_IN_FORMATS = ("aoti",)  # not in "all": an AOTInductor compile takes minutes
INIT_SEED = 0  # the RNG seed new adapters are initialised with in a compile
Progress = Callable[[str], None]


@dataclass
class Check:
    """One artifact checked on one input shape."""

    artifact: str
    shape: str
    errors: list[OutputError]

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.errors)


@dataclass
class Result:
    captured: Captured
    sites: SiteMap
    graph: fx.GraphModule
    pass_counts: dict[str, int]
    checks: list[Check] = field(default_factory=list)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    swappable: swap.Plan | None = None  # --swappable: the adapter inputs and every adapter's values

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


class _Timer:
    def __init__(self, timings: dict[str, float], progress: Progress) -> None:
        self.timings, self.progress = timings, progress

    @contextlib.contextmanager
    def __call__(self, stage: str, message: str):
        self.progress(message)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(time.perf_counter() - start, 3)


def verification_shapes(captured: Captured) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The example inputs and a second shape (other batch and sequence length) for every check."""
    example = captured.example_inputs
    first = next(iter(example.values()))
    seq = first.shape[1] if first.dim() > 1 and "pixel_values" not in example else None
    # Static dims (pinned by BatchSplit / Split, or captured from given example inputs) keep their size.
    dims = captured.dynamic_shapes.get(next(iter(example)), {0: None, 1: None})
    batch = (3 if first.shape[0] != 3 else 4) if 0 in dims else first.shape[0]
    second = captured.inputs(batch, (5 if seq != 5 else 6) if 1 in dims or seq is None else seq, seed=7)
    if "task_ids" in example:  # MultiTask: route the rows to every child in turn
        second["task_ids"] = torch.arange(batch) % (int(example["task_ids"].max()) + 1)
    def describe(inputs):
        return "x".join(str(d) for d in next(iter(inputs.values())).shape[:2 if seq else 1])
    name = describe(second)  # the checks are keyed by name: with every dim static, tell the two apart
    return [(describe(example), example), (name if name != describe(example) else name + " (2)", second)]


def build(model: torch.nn.Module | str, spec: Spec, task: str | None = None, example_inputs: dict | None = None,
          progress: Progress = lambda _: None, snapshot: Callable | None = None, debug: bool | None = None,
          rewrite: Callable = pass_list.rewrite) -> Result:
    """Capture and rewrite (no export): the GraphModule with adapters, and the reference outputs. In debug mode
    the graph is run on the example inputs after every rewrite pass. `rewrite`: pass_list.rewrite, or a
    variant that runs it in parts (export/swappable.py)."""
    timings: dict[str, float] = {}
    stage = _Timer(timings, progress)
    pins = pinned_dims(spec.setup)
    tasks = multi_task_children(spec.setup)
    task_shapes = None
    if tasks:  # MultiTask routes rows by a task_ids input: capture the model with it, batch and sequence dynamic
        model, example_inputs, task_shapes = with_task_ids(model, example_inputs, task, tasks)
        if 1 not in task_shapes["input_ids"]:
            pins.setdefault("seq", example_inputs["input_ids"].shape[1])  # a length-1 example stays static
    with stage("capture", "capturing the model with torch.export"):
        captured = capture(model, example_inputs, task=task, dynamic_shapes=task_shapes, **pins)
    if spec.setup is not None:
        first = next(iter(captured.example_inputs.values()))
        check_sizes(spec.setup, first.shape[0], first.shape[1] if first.dim() > 1 else None)
    gm = captured.module
    with stage("sites", "finding adapter sites"):
        sites = find_sites(gm)
    snapshots = [snapshot(gm, "captured")] if snapshot else []
    hidden = getattr(captured.config, "hidden_size", None) if captured.config is not None else None
    prefix = captured.info.get("base_model_prefix", "")
    context = pass_list.Context(spec, sites, prefix, hidden)
    check = pass_checks.graph_runs(captured.example_inputs) if pass_list.debug_enabled(debug) else None
    # New adapters are initialised from a fixed seed (the caller's RNG state is left as it was), so the same
    # spec compiles to the same bytes; checkpoint weights overwrite the initial values anyway.
    with stage("rewrite", "inserting adapters"), torch.random.fork_rng(devices=[]), _checkpoint_bound(spec, gm):
        torch.manual_seed(INIT_SEED)
        gm, counts = rewrite(gm, context, check)
    # Re-export with the dims the setup pins static and a Parallel's batch bounded.
    captured.dynamic_shapes = setup_dynamic_shapes(captured.dynamic_shapes, spec.setup)
    if pins:
        captured.info["pinned"] = pins
    if snapshot:
        snapshots.append(snapshot(gm, "rewritten"))
    result = Result(captured, sites, gm, counts, timings=timings, snapshots=snapshots)
    return result


def _checkpoint_bound(spec: Spec, gm: fx.GraphModule) -> contextlib.AbstractContextManager:
    """Where active adapters come from checkpoints, what the rewrite allocates is bounded by what those
    checkpoints hold (checkpoints/bounds.py): a hostile config (`r: 10**9`) is refused before it is allocated.
    Adapters and fusions the spec builds fresh (composed with loaded ones) may add up to twice the model's
    parameters: far more than any sane adapter, far less than what a hostile size asks for."""
    adapters = [spec.adapters[name] for name in spec.active]
    loaded = [a for a in adapters if a.load is not None]
    if not loaded:
        return contextlib.nullcontext()  # sizes the user wrote in the spec are theirs to choose
    directories = [a.load for a in loaded] + [f.load for f in spec.fusions if f.load is not None]
    fresh = len(loaded) < len(adapters) or any(f.load is None for f in spec.fusions)
    extra = 2 * sum(p.numel() for p in gm.parameters()) if fresh else 0
    path = f"{loaded[0].path}.load" if len(loaded) == 1 else "$.adapters"
    return allocation_bound(directories, path, extra)


def optimize(result: Result, spec: Spec, progress: Progress = lambda _: None,
             snapshot: Callable | None = None, check: pass_list.Check | None = None) -> None:
    """The OPTIMIZE passes of pass_list, in order; `check` runs after each (debug mode)."""
    context = pass_list.Context(spec)
    with _Timer(result.timings, progress)("optimize", "optimizing: " + ", ".join(pass_list.optimize_names(context))):
        result.graph, counts = pass_list.optimize(result.graph, context, check)
    result.pass_counts.update(counts)
    if snapshot:
        result.snapshots.append(snapshot(result.graph, "optimized"))


def compile_model(model: torch.nn.Module | str, spec: Spec, out_dir: Path, formats: tuple[str, ...] = ("onnx",),
                  task: str | None = None, atol: float = 1e-4, progress: Progress = lambda _: None,
                  rtol: float = 1e-4, built: Result | None = None, debug: bool | None = None,
                  ort_optimize: bool = False, quantize: str | None = None, swappable: bool = False) -> Result:
    """The whole pipeline; writes OUT/model.onnx (etc.) and OUT/report.json. `built` is an already captured
    and rewritten graph (AdaptedModel.compile); `model` is then only its description. `debug` (default:
    FXADAPT_DEBUG=1) checks the graph after every pass and names the first pass that changes the outputs.
    `ort_optimize` / `quantize="int8"` also write OUT/model.opt.onnx / OUT/model.int8.onnx (docs/deploy.md)."""
    if (ort_optimize or quantize) and "onnx" not in formats:
        raise UserError("--ort-optimize and --quantize work on the ONNX export; add onnx to --format.")
    with (publication := Publication(Path(out_dir))) as staging:
        if swappable and not {"onnx", "aoti"} & set(formats):
            raise UserError("--swappable needs a swappable artifact: add onnx or aoti (AOTInductor) to --format.")
        # --swappable: every adapter of the spec inserted, unmerged (export/swappable.py); `built` is never swappable
        compiled = swap.swappable_spec(spec) if swappable and built is None else spec
        rewrite = swap.rewrite if compiled is not spec else pass_list.rewrite
        result = built if built is not None else build(model, compiled, task=task, progress=progress, debug=debug,
                                                       rewrite=rewrite)
        shapes = verification_shapes(result.captured)
        if compiled is not spec:  # each adapter compiled alone: its values, and the outputs its adapter file must give
            result.swappable, adapter_references = swap.prepare(
                result.graph, result.captured, spec, lambda one: build(model, one, task=task).graph, shapes)
        with torch.no_grad():
            references = {name: flatten_outputs(result.graph(**inputs)) for name, inputs in shapes}
        tolerance = (atol, rtol)
        check = pass_checks.outputs_unchanged(shapes, references, result.captured.output_names, tolerance) if (
            pass_list.debug_enabled(debug)) else None
        optimize(result, compiled, progress, check=check)
        _export_all(result, spec, formats, staging, shapes, references, tolerance, progress)
        if result.swappable is not None:
            _adapter_files(result, staging, formats, shapes, adapter_references, tolerance, progress)
        if ort_optimize or quantize:
            _onnx_variants(result, staging, shapes, references, tolerance, progress, ort_optimize, quantize)
        _write_report(result, spec, staging, tolerance)
        publication.commit()
    return result


def _check(result: Result, artifact: str, run: Callable[[dict], list], shapes, references,
           tolerance: tuple[float, float]) -> None:
    names = result.captured.output_names
    for shape, inputs in shapes:
        result.checks.append(Check(artifact, shape, compare(names, references[shape], run(inputs), *tolerance)))


def _export_all(result: Result, spec: Spec, formats, staging: Path, shapes, references, tolerance, progress) -> None:
    # Imported here: the exporters pull in onnx / onnxscript, which `build` and `fxadapt sites` never need.
    from .export.onnx import export_onnx, run_onnx
    from .export.prepare import for_export

    captured = result.captured
    stage = _Timer(result.timings, progress)
    _check(result, "graph", lambda inputs: flatten_outputs(result.graph(**inputs)), shapes, references, tolerance)
    with stage("reexport", "re-exporting the rewritten graph"):
        ep = export_program(for_export(result.graph)[0], captured.example_inputs, captured.dynamic_shapes)
    if "onnx" in formats:
        path = staging / "model.onnx"
        with stage("onnx", "exporting to ONNX"), _quiet_onnx():
            info = export_onnx(ep, path, captured.output_names) if result.swappable is None else (
                swap.export_onnx(result.graph, captured, result.swappable, path))
        result.artifacts["onnx"] = {"path": "model.onnx", **info}
        with stage("onnx_verify", "verifying ONNX Runtime outputs"):
            _check(result, "onnx", lambda inputs: run_onnx(path, inputs), shapes, references, tolerance)
    if "torchscript" in formats:
        from .export.torchscript import export_torchscript  # as above: only the torchscript format needs it

        path = staging / "model.ts"
        with stage("torchscript", "exporting to TorchScript"):
            scripted = export_torchscript(ep, captured.input_names, captured.output_names, str(path))
        result.artifacts["torchscript"] = {"path": "model.ts"}
        with stage("torchscript_verify", "verifying TorchScript outputs"), torch.no_grad():
            _check(result, "torchscript", lambda inputs: list(scripted(*[inputs[n] for n in captured.input_names])),
                   shapes, references, tolerance)
    if "pt2" in formats:
        path = staging / "model.pt2"
        with stage("pt2", "saving the ExportedProgram (.pt2)"):
            save_program(ep, path)
        result.artifacts["pt2"] = {"path": "model.pt2"}
        loaded = torch.export.load(str(path)).module()
        with torch.no_grad():
            _check(result, "pt2", lambda inputs: flatten_outputs(loaded(**inputs)), shapes, references, tolerance)
    if "aoti" in formats:
        from .export import aoti  # as above: only the aoti format needs the compiler

        path = staging / aoti.PACKAGE
        with stage("aoti", "compiling with AOTInductor (.aoti.pt2)"):
            result.artifacts["aoti"] = {"path": path.name, **aoti.export_aoti(ep, path)}
        compiled = aoti.load_aoti(path)
        if result.swappable is not None:  # its adapter tensors are constants the adapter files replace
            result.artifacts["aoti"].update(aoti.check_adapter_constants(compiled, result.swappable.layout,
                                                                         prune="onnx" not in formats))
        with torch.no_grad():
            _check(result, "aoti", lambda inputs: flatten_outputs(compiled(**inputs)), shapes, references, tolerance)


def _onnx_variants(result: Result, staging: Path, shapes, references, tolerance, progress, ort_optimize: bool,
                   quantize: str | None) -> None:
    """OUT/model.opt.onnx (ONNX Runtime's optimizer, verified like model.onnx) and OUT/model.int8.onnx (of the
    optimized graph where both are asked for; judged by cosine similarity). Each must still hold every adapter
    weight of model.onnx by name: a failed check names the ones it lost."""
    import onnx  # heavy, as in _export_all

    from .export.onnx import run_onnx
    from .export.ort_optimize import adapter_weights, missing_adapter_weights, optimize_onnx
    from .export.quantize import MIN_COSINE, quantize_onnx, quantized_errors

    stage = _Timer(result.timings, progress)
    source = staging / "model.onnx"
    expected = adapter_weights(onnx.load(str(source), load_external_data=False))
    steps = [("onnx_opt", "model.opt.onnx")] if ort_optimize else []
    steps += [("onnx_int8", "model.int8.onnx")] if quantize else []
    for artifact, name in steps:
        path = staging / name
        with stage(artifact, f"writing {name}"):
            info = optimize_onnx(source, path, result.captured.config) if artifact == "onnx_opt" else (
                {"source": source.name, "min_cosine": MIN_COSINE, **quantize_onnx(source, path)})
        missing = missing_adapter_weights(expected, onnx.load(str(path), load_external_data=False))
        result.artifacts[artifact] = {"path": name, **info, "adapter_weights": len(expected) - len(missing)}
        if missing:
            lost = [OutputError(f"adapter weight {n}", math.inf, math.inf, False) for n in missing]
            result.checks.append(Check(artifact, "adapter weights", lost))
        if artifact == "onnx_opt":
            _check(result, artifact, lambda inputs, p=path: run_onnx(p, inputs), shapes, references, tolerance)
            source = path
        else:
            names = result.captured.output_names
            for shape, inputs in shapes:
                result.checks.append(Check(artifact, shape, quantized_errors(names, references[shape],
                                                                             run_onnx(path, inputs))))


def _adapter_files(result: Result, staging: Path, formats, shapes, adapter_references, tolerance, progress) -> None:
    """OUT/adapters/: layout.json and one .onnx_adapter per adapter; one ONNX Runtime session, and one AOTInductor
    package with the file swapped into its constants, must give with each file the outputs of that adapter
    compiled alone (export/swappable.py, export/aoti.py)."""
    plan = result.swappable
    assert plan is not None
    with _Timer(result.timings, progress)("adapter_files", "writing and verifying the adapter files"):
        files = swap.write_files(plan, staging)
        runners = []
        if "onnx" in formats:
            run = swap.onnx_runner(staging / "model.onnx")
            runners.append(("onnx", lambda inputs, file: run(inputs, staging / file)))
        if "aoti" in formats:
            from .runtime import AotiSession  # as in _export_all: the compiler stack

            session = AotiSession(staging)
            runners.append(("aoti", lambda inputs, file: flatten_outputs(session.run(inputs, staging / file))))
        for artifact, run_with in runners:
            for name, file in files.items():
                _check(result, f"{artifact}+{name}", lambda inputs, r=run_with, f=file: r(inputs, f), shapes,
                       adapter_references[name], tolerance)
    result.artifacts["adapters"] = {"path": "adapters", "layout": plan.layout.digest, "files": files,
                                    "active": plan.layout.active}


class _quiet_onnx:
    """torch.onnx logs warnings about optional torchvision ops on every export; they are noise here."""

    def __enter__(self):
        self.logger = logging.getLogger("torch.onnx")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def report_json(result: Result, spec: Spec, tolerance: tuple[float, float]) -> dict[str, Any]:
    placements = result.graph.meta.get("fxadapt", {}).get("placements", [])
    artifacts: dict[str, Any] = {"graph": {}}
    artifacts.update({k: dict(v) for k, v in result.artifacts.items()})
    for check in result.checks:
        entry = artifacts.setdefault(check.artifact, {})
        entry.setdefault("checks", []).append({"shape": check.shape, "ok": check.ok,
                                               "outputs": {e.name: e.to_json() for e in check.errors}})
    for entry in artifacts.values():
        entry["ok"] = all(c["ok"] for c in entry.get("checks", []))
    return {
        "fxadapt": __version__,
        "model": result.captured.source,
        "model_class": result.captured.info.get("class"),
        "inputs": result.captured.input_names,
        "outputs": result.captured.output_names,
        "spec": spec.to_json(),
        "sites": [{"adapter": p.adapter, "method": p.method, "site": p.role, "layer": p.layer,
                   "module": p.module_path, "reference_module": p.reference_module} for p in placements],
        "passes": result.pass_counts,
        # fuse_parallel_branches' record: the groups fused, what it left and why, op and matmul counts before/after
        "fused_branches": result.graph.meta.get("fxadapt", {}).get("fused"),
        # fold_fusion's refusals: the AdapterFusion modules it left unfolded, each with the reason
        "not_folded": result.graph.meta.get("fxadapt", {}).get("not_folded", []),
        # route_rows' refusals: the multi_task sites it left unrouted, each with the reason
        "not_routed": result.graph.meta.get("fxadapt", {}).get("not_routed", []),
        "pinned": result.captured.info.get("pinned", {}),
        "tolerance": {"atol": tolerance[0], "rtol": tolerance[1], "rule": "max|a - r| <= atol + rtol * max|r|"},
        "artifacts": artifacts,
        "ok": result.ok,
        "timings_s": result.timings,
    }


def _write_report(result: Result, spec: Spec, staging: Path, tolerance: tuple[float, float]) -> None:
    # Strict JSON (no bare NaN/Infinity tokens, which strict parsers reject): a non-finite number is null.
    report = json.dumps(_finite(report_json(result, spec, tolerance)), indent=2, allow_nan=False)
    (staging / "report.json").write_text(report + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
