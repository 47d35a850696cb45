"""`fxadapt` command line: compile, adapters export, sites, inspect.

Exit codes (DESIGN.md): 0 ok, 2 user error (one-paragraph message, no traceback), 3 verification
above tolerance (artifacts kept), 1 a bug in fxadapt. Heavy imports happen inside the commands so
`--help` is fast. `compile --debug` or FXADAPT_DEBUG=1 checks the graph after every pass
(fxadapt/pass_checks.py); FXADAPT_DEBUG=1 also lets a bug's exception propagate with its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path

from .errors import UserError

DEFAULT_MODEL = "builtin:tiny-bert"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(start: float):
    def report(message: str) -> None:
        _say(f"  [{time.perf_counter() - start:6.1f}s] {message}")
    return report


def _formats(value: str) -> tuple[str, ...]:
    from .pipeline import FORMATS, OPT_IN_FORMATS

    chosen = FORMATS if value == "all" else tuple(v.strip() for v in value.split(","))
    known = FORMATS + OPT_IN_FORMATS
    bad = [f for f in chosen if f not in known]
    if bad:
        raise UserError(f"--format: unknown format(s) {', '.join(bad)}; choose from {', '.join(known)} or all "
                        f"({', '.join(FORMATS)}).")
    return chosen


def cmd_compile(args: argparse.Namespace) -> int:
    from .pipeline import compile_model, report_json
    from .spec import load_spec

    start = time.perf_counter()
    spec = load_spec(args.spec)
    formats = _formats(args.format)
    _say(f"fxadapt compile {args.model} --spec {args.spec} -> {args.output}")
    result = compile_model(args.model, spec, Path(args.output), formats, args.task, args.atol, _progress(start),
                           rtol=args.rtol, debug=True if args.debug else None, ort_optimize=args.ort_optimize,
                           quantize=args.quantize, swappable=args.swappable)
    report = report_json(result, spec, (args.atol, args.rtol))
    print()
    for check in result.checks:
        for error in check.errors:
            mark = "ok" if error.ok else "FAIL"
            judged = (f"cosine {error.cosine:.5f} (min {error.min_cosine:g})" if hasattr(error, "cosine")
                      else f"(atol {args.atol:g}, rtol {args.rtol:g})")  # a quantized artifact: by cosine
            print(f"  [{mark:>4}] {check.artifact:<12} {check.shape:<6} {error.name:<22} max abs {error.max_abs:.1e}"
                  f"  rel {error.max_rel:.1e}  {judged}")
    placements = report["sites"]
    adapters = ", ".join(f"{n} ({a['method']})" for n, a in report["spec"]["adapters"].items()
                         if n in spec.active)
    print()
    print(f"  model     {report['model']} ({report['model_class']})")
    print(f"  adapters  {adapters} at {len(placements)} sites")
    print("  passes    " + ", ".join(f"{k}: {v}" for k, v in report["passes"].items()))
    print("  artifacts " + ", ".join(f"{Path(args.output) / a['path']}" for a in report["artifacts"].values()
                                     if "path" in a))
    print(f"  report    {Path(args.output) / 'report.json'}  ({time.perf_counter() - start:.1f}s)")
    if not result.ok:
        _say("verification failed: some outputs differ from the eager reference beyond --atol/--rtol "
             "(artifacts kept; see report.json).")
        return 3
    return 0


def cmd_adapters_export(args: argparse.Namespace) -> int:
    from .export.checkpoint_export import export_adapter_file

    model_dir = Path(args.model_dir) if args.model_dir else None
    slot = export_adapter_file(Path(args.source), Path(args.output), model_dir, args.slot)
    _say(f"wrote {args.output} (in the place of adapter {slot!r})")
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    from .capture import capture
    from .sites import describe, find_sites

    if args.spec is None:
        captured = capture(args.model, task=args.task)
        print(describe(find_sites(captured.module)))
        return 0
    from .pipeline import build
    from .spec import load_spec

    result = build(args.model, load_spec(args.spec), task=args.task)
    print(describe(result.sites))
    print("\nadapters at sites (under the spec's composition):")
    placements = result.graph.meta.get("fxadapt", {}).get("placements", [])
    for p in sorted(placements, key=lambda p: (p.layer, p.role, p.adapter)):
        layer = "shared" if p.layer < 0 else f"layer {p.layer}"
        print(f"  {layer:<8} {p.role:<16} {p.adapter:<16} {p.method:<14} {p.module_path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .pipeline import build, optimize
    from .spec import load_spec

    try:
        from .tools.graph_json import snapshot
        from .tools.render import render
    except ImportError:
        raise UserError("the graph visualizer is not available in this installation.") from None
    spec = load_spec(args.spec)
    result = build(args.model, spec, task=args.task, progress=_progress(time.perf_counter()), snapshot=snapshot)
    optimize(result, spec, snapshot=snapshot)
    output = render(result.snapshots, args.format)
    if args.output in (None, "-"):
        sys.stdout.write(output if output.endswith("\n") else output + "\n")
        return 0
    path = Path(args.output)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(output)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror}); choose a writable -o path.") from None
    _say(f"wrote {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fxadapt", description="Adapters for any PyTorch model, as a graph compiler.")
    sub = top.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"Hugging Face model directory or hub id, or builtin:NAME (default {DEFAULT_MODEL})")
        p.add_argument("--task", help="model class to load, e.g. sequence-classification (default: from config)")

    p = sub.add_parser("compile", help="insert adapters, optimize, export and verify")
    model_args(p)
    p.add_argument("--spec", required=True, help="composition spec (JSON)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--format", default="all",
                   help="onnx, torchscript, pt2, aoti (AOTInductor; slow to compile), a comma list, or all "
                        "(default: onnx, torchscript, pt2)")
    p.add_argument("--ort-optimize", action="store_true",
                   help="also write model.opt.onnx: ONNX Runtime's transformer optimizer (fused attention, "
                        "LayerNorm, GELU), verified like model.onnx (docs/deploy.md)")
    p.add_argument("--quantize", choices=["int8"],
                   help="also write model.int8.onnx: dynamic int8 quantization (of model.opt.onnx with "
                        "--ort-optimize), judged by cosine similarity >= 0.99 per output")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance per element (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="relative tolerance: ok where max|a - r| <= atol + rtol * max|r| (default 1e-4)")
    p.add_argument("--debug", action="store_true",
                   help="check the graph after every pass and name the first optimization pass that changes the "
                        "outputs beyond atol/rtol (also FXADAPT_DEBUG=1)")
    p.add_argument("--swappable", action="store_true",
                   help="one model.onnx for all the spec's adapters: adapter weights are graph inputs (defaults: the "
                        "active adapter), OUT/adapters/<name>.onnx_adapter per adapter; with --format aoti the "
                        "package's constants take the same files (docs/deploy.md)")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("adapters", help="adapter files for swappable models")
    actions = p.add_subparsers(dest="action", required=True)
    p = actions.add_parser("export", help="convert an AdapterHub or PEFT checkpoint into an .onnx_adapter file")
    p.add_argument("source", help="checkpoint directory, or a spec whose active adapter loads one")
    p.add_argument("-o", "--output", required=True, help="the .onnx_adapter file to write")
    p.add_argument("--model-dir", help="the swappable model's OUT (default: the OUT whose adapters/ holds -o)")
    p.add_argument("--slot", help="the compiled adapter whose place it takes (default: the first that fits)")
    p.set_defaults(run=cmd_adapters_export)

    p = sub.add_parser("sites", help="print the adapter sites found in a model, per layer")
    model_args(p)
    p.add_argument("--spec", help="also show which adapter acts at which site under this spec")
    p.set_defaults(run=cmd_sites)

    p = sub.add_parser("inspect", help="visualize the graph before/after rewriting")
    model_args(p)
    p.add_argument("--spec", required=True, help="composition spec (JSON)")
    p.add_argument("-o", "--output", help="output file (default: stdout)")
    p.add_argument("--format", default="html", choices=["html", "text", "dot", "svg", "json"])
    p.set_defaults(run=cmd_inspect)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    debug = os.environ.get("FXADAPT_DEBUG") == "1"
    previous = _terminate_like_interrupt()
    try:
        return args.run(args)
    except UserError as exc:
        _say("error: " + textwrap.fill(str(exc), width=100, subsequent_indent="  "))
        return exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted; no output written.")
        return 130
    except Exception:
        if debug:
            raise
        traceback.print_exc()
        _say("error: this is a bug in fxadapt; please report it with the traceback above.")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_like_interrupt():
    """SIGTERM (what `docker stop`, `kill` and CI timeouts send) unwinds like Ctrl-C, so staging directories
    are removed and nothing half-written is published. Returns the previous handler (None off the main thread,
    where Python cannot install handlers)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
