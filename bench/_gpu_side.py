"""The GPU mode of bench/side_by_side.py (`--device cuda`; issue #11, item 4): the reference eager models
against fxadapt's `.pt2` graphs run in PyTorch, eager and under torch.compile, fp16, batch 1 and 32 x 128,
timed interleaved in one process. `bench/gpu_side_by_side.sh` prepares a bare GPU machine and runs it.

Per variant (adapters 1.3.0: seq_bn, LoRA, Fuse(2 x seq_bn), Parallel; PEFT: one LoRA, eight LoRAs mixed
per row with `adapter_names`): the reference model is loaded from the saved directories
(bench/_reference_models.py); fxadapt's side is `fxadapt compile --format pt2` of the same spec as the CPU
mode, loaded with `torch.export.load(...).module()` after `move_to_device_pass`. Parity first, in fp32 on
the device (TF32 off), at 1e-5; then both sides go to fp16 and each one's max abs error against the fp32
reference is printed: fxadapt's fp16 graph passes when it is within twice the reference's own fp16 error
(+1e-3), the reference's rounding being the yardstick. A failed parity is flagged in the table rather than
stopping the run: a lent GPU is one call. What cannot run (no CUDA, no reference stack, a compile that
fails, a torch.compile past --budget-s) is a row "not available: <why>".

`--device cpu-check` runs this same code on the CPU (use --small): it checks the harness, not speed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers

try:  # torch >= 2.7
    from torch.export.passes import move_to_device_pass
except ImportError:
    move_to_device_pass = None

try:  # the reference stack (adapters 1.3.0 needs transformers 4.57): absent on a bare device image
    import adapters
    import peft
    from _fxadapt_side import compile_variant
    from _reference_models import build_all, load_reference, routed_names
except ImportError as missing_stack:
    STACK_MISSING = f"reference stack not importable ({missing_stack}); carry its wheels: bench/gpu_side_by_side.sh"
else:
    STACK_MISSING = ""

GPU_LABELS = {
    "seq_bn": "adapters seq_bn",
    "lora": "adapters LoRA r=8 on q,v,intermediate,output (unmerged)",
    "fuse": "adapters Fuse(2 x seq_bn)",
    "parallel": "adapters Parallel(2 x seq_bn) / two base runs",
    "peft_lora": "PEFT LoRA r=8 (unmerged)",
    "peft_mixed": "PEFT 8 LoRAs mixed per row (adapter_names) vs fxadapt multi_task",
}
REF_OF = {"peft_lora": "route1", "peft_mixed": "route8"}  # load_reference's name of the reference model
FX_OF = {"peft_mixed": "route8"}  # compile_variant's name of the spec
ROUTED = {"peft_mixed": 8}  # row r uses adapter r * 8 // batch
BASE_RUNS = {"parallel": 2}  # Parallel doubles the batch: its ratio is to two base runs
SEQ = 128
MODES = ("eager", "compile")
FP32_LIMIT = 1e-5
OUTPUTS = ("last_hidden_state", "pooler_output")
Key = tuple[str, str, int, str]  # (side "fx" | "ref", variant or "base", batch, mode)


def why_not_here(device: str) -> str:
    """Why this mode cannot run here at all (every reason), or ""."""
    reasons = []
    if device == "cuda" and not torch.cuda.is_available():
        reasons.append(f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)")
    if STACK_MISSING:
        reasons.append(STACK_MISSING)
    if move_to_device_pass is None:
        reasons.append(f"torch {torch.__version__} has no torch.export.passes.move_to_device_pass")
    return "; ".join(reasons)


def max_abs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(float((got[n].double() - want[n].double()).abs().max()) for n in OUTPUTS)


def load_pt2(path: Path, device: str) -> torch.nn.Module:
    """fxadapt's .pt2 (exported on the CPU in fp32) on `device`: move_to_device_pass rewrites the device
    literals the export baked in (arange(device=cpu), metadata asserts), then the module is unlifted."""
    program = move_to_device_pass(torch.export.load(str(path)), device)
    return program.module()


def to_half(module: torch.nn.Module, graph: bool) -> int:
    """Parameters and floating buffers to fp16, in place; in an exported graph also its fp32 dtype literals
    (a mask built `.to(float32)` at export time), as HF's own .half() model builds them in its dtype.
    Returns how many literals changed."""
    module.half()
    if not graph:
        return 0
    changed = 0
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        args = tuple(torch.float16 if a is torch.float32 else a for a in node.args)
        kwargs = {k: torch.float16 if v is torch.float32 else v for k, v in node.kwargs.items()}
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    if changed:
        module.recompile()
    return changed


class GpuBench:
    """The models of one run (both sides, fp32 then fp16), their inputs per batch and a callable per key."""

    def __init__(self, args: argparse.Namespace, device: str, root: Path) -> None:
        self.args, self.device, self.root = args, device, root
        self.vocab = transformers.BertConfig.from_pretrained(str(root / "base")).vocab_size
        self.models: dict[tuple[str, str], torch.nn.Module] = {}
        self.compiled: dict[tuple[str, str], torch.nn.Module] = {}
        self.missing: dict[tuple, str] = {}  # (variant,) or (variant, batch, mode) -> why
        self.ref32: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self.inputs = {b: self._inputs(b) for b in args.batches}

    def _inputs(self, batch: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 * batch + SEQ)  # the CPU mode's inputs at that shape
        return {"input_ids": torch.randint(1, self.vocab, (batch, SEQ), generator=gen).to(self.device),
                "attention_mask": torch.ones(batch, SEQ, dtype=torch.long, device=self.device)}

    def load(self, variant: str, pt2: Path | str) -> None:
        if isinstance(pt2, str):
            self.missing[(variant,)] = pt2
            return
        try:
            self.models[("fx", variant)] = load_pt2(pt2, self.device)
            self.models[("ref", variant)] = load_reference(self.root, REF_OF.get(variant, variant)).to(self.device)
        except Exception as err:  # noqa: BLE001 - one variant that cannot load is a row, not the end of the run
            self.missing[(variant,)] = f"loading failed: {' '.join(str(err).split())[:200]}"

    def run(self, side: str, variant: str, batch: int, module: torch.nn.Module | None = None) -> dict:
        module = self.models[(side, variant)] if module is None else module  # not `or`: Module may define len()
        extra: dict = {}
        if variant in ROUTED:
            ids = [r * ROUTED[variant] // batch for r in range(batch)]
            extra = ({"task_ids": torch.tensor(ids, device=self.device)} if side == "fx" else
                     {"adapter_names": [routed_names(ROUTED[variant])[i] for i in ids]})
        with torch.no_grad():
            out = module(**self.inputs[batch], **extra)
        return {name: out[name] for name in OUTPUTS}

    def call(self, key: Key) -> Callable[[], dict]:
        side, variant, batch, mode = key
        module = self.compiled[(side, variant)] if mode == "compile" else self.models[(side, variant)]
        return lambda: self.run(side, variant, batch, module)


def parity(bench: GpuBench, names: list[str]) -> None:
    """fp32 on the device at 1e-5, then both sides to fp16 and each one's error against the fp32 reference."""
    print(f"\nParity on {bench.device}: fxadapt .pt2 vs the reference eager model, max abs over {', '.join(OUTPUTS)}")
    print(f"  fp32 (TF32 off), limit {FP32_LIMIT:g}:")
    for variant in names:
        for batch in bench.args.batches:
            want = bench.run("ref", variant, batch)
            bench.ref32[(variant, batch)] = want
            error = max_abs(bench.run("fx", variant, batch), want)
            if error > FP32_LIMIT:
                bench.missing.setdefault((variant, batch, "parity"), f"fp32 parity FAIL {error:.1e}")
            base = bench.ref32[("base", batch)]["last_hidden_state"]  # "base" comes first in `names`
            hidden = want["last_hidden_state"]
            moved = float((hidden - base.repeat(hidden.shape[0] // base.shape[0], 1, 1)).abs().max())
            print(f"    [{'ok' if error <= FP32_LIMIT else 'FAIL':>4}] {variant:<10} b{batch}: {error:.2e}"
                  f"{'' if variant == 'base' else f'; effect vs base {moved:.3g}'}")
    literals = 0
    for (side, _), module in bench.models.items():
        literals += to_half(module, graph=side == "fx")
    print(f"  fp16 (both sides .half(); {literals} fp32 dtype literals in fxadapt graphs set to fp16); "
          "error vs the fp32 reference, limit 2 x the reference's own + 1e-3:")
    for variant in names:
        for batch in bench.args.batches:
            want = bench.ref32[(variant, batch)]
            ref16 = bench.run("ref", variant, batch)
            fx16 = bench.run("fx", variant, batch)
            ref_err, fx_err, between = max_abs(ref16, want), max_abs(fx16, want), max_abs(fx16, ref16)
            ok = fx_err <= 2 * ref_err + 1e-3
            if not ok:
                bench.missing.setdefault((variant, batch, "parity"), f"fp16 parity FAIL {fx_err:.1e}")
            print(f"    [{'ok' if ok else 'FAIL':>4}] {variant:<10} b{batch}: fxadapt {fx_err:.2e}, reference "
                  f"{ref_err:.2e}; fxadapt vs reference fp16 {between:.2e}")


def compile_all(bench: GpuBench, names: list[str], deadline: float) -> None:
    """torch.compile every model (static shapes), warmed up at each batch while time is left before
    `deadline`; what does not fit or fails is a row "not available"."""
    print("\ntorch.compile (dynamic=False; warm-up at each batch; error vs the fp32 reference):", flush=True)
    for batch in sorted(bench.args.batches, reverse=True):  # b32 first: the shape the issue quotes
        for variant in names:
            for side in ("ref", "fx"):
                where = (variant, batch, "compile")
                if (variant,) in bench.missing or where in bench.missing:
                    continue
                if time.monotonic() > deadline:
                    bench.missing[where] = f"torch.compile skipped: past --budget-s {bench.args.budget_s:g}"
                    continue
                module = bench.compiled.setdefault((side, variant),
                                                   torch.compile(bench.models[(side, variant)], dynamic=False))
                start = time.monotonic()
                try:
                    out = bench.run(side, variant, batch, module)
                except Exception as err:  # noqa: BLE001 - a model torch.compile cannot take is a row
                    bench.missing[where] = f"torch.compile failed ({side}): {' '.join(str(err).split())[:160]}"
                    print(f"  {side:<3} {variant:<10} b{batch}: {bench.missing[where]}", flush=True)
                    continue
                error = max_abs(out, bench.ref32[(variant, batch)])
                print(f"  {side:<3} {variant:<10} b{batch}: {time.monotonic() - start:5.1f} s, "
                      f"max abs {error:.2e}", flush=True)


def time_interleaved(bench: GpuBench, keys: list[Key], reps: int, warmup: int = 3) -> dict[Key, float]:
    """Median seconds per key, synchronizing around each call; every round runs every key once, in a fresh
    shuffled order (seeded), so clock and load changes hit all variants alike."""
    calls = {k: bench.call(k) for k in keys}
    sync = torch.cuda.synchronize if bench.device == "cuda" else (lambda: None)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict[Key, list[float]] = {k: [] for k in calls}
    order, rng = list(calls), random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for key in order:
            sync()
            start = time.perf_counter()
            calls[key]()
            sync()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def row_missing(bench: GpuBench, variant: str, batch: int, mode: str) -> str:
    for where in ((variant,), ("base",), (variant, batch, mode), ("base", batch, mode)):
        if where in bench.missing:
            return bench.missing[where]
    return ""


def print_table(bench: GpuBench, names: list[str], t: dict[Key, float]) -> None:
    print("\n| variant | batch | mode | fxadapt / fxadapt base | reference / its base | speed-up over reference "
          "| fxadapt ms | reference ms |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in names:
        for batch in bench.args.batches:
            for mode in MODES:
                head = f"| {GPU_LABELS[variant]} | {batch} | {mode} |"
                why = row_missing(bench, variant, batch, mode)
                if why:
                    print(f"{head} not available: {why} | | | | |")
                    continue
                fx, fb, ref, rb = (t[(s, v, batch, mode)] for s, v in (("fx", variant), ("fx", "base"),
                                                                          ("ref", variant), ("ref", "base")))
                runs = BASE_RUNS.get(variant, 1)
                failed = bench.missing.get((variant, batch, "parity"))
                flag = f" ({failed})" if failed else ""
                print(f"{head} {fx / (runs * fb):.3f}{flag} | {ref / (runs * rb):.3f} | {ref / fx:.2f}x | "
                      f"{fx * 1e3:.3f} | {ref * 1e3:.3f} |")
    for batch in bench.args.batches:
        for mode in MODES:
            keys = [("fx", "base", batch, mode), ("ref", "base", batch, mode)]
            if all(k in t for k in keys):
                print(f"Base b{batch} {mode}: fxadapt .pt2 {t[keys[0]] * 1e3:.3f} ms, HF {t[keys[1]] * 1e3:.3f} ms")


def print_header(args: argparse.Namespace, device: str, version: str) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    name = "CPU (cpu-check)" if device == "cpu" else "no CUDA device"
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    stack = "missing" if STACK_MISSING else f"adapters {adapters.__version__}, peft {peft.__version__}"
    print(f"side_by_side --device {args.device} {now}; {name}; torch {torch.__version__} (CUDA "
          f"{torch.version.cuda}), transformers {transformers.__version__}, {stack}")
    print(f"fxadapt {version}; {'BERT 2 x 128 (--small)' if args.small else 'BERT-base 12 x 768 (random init)'}; "
          f"batches {args.batches} x {SEQ}; fp32 parity, fp16 timing; {args.reps} interleaved rounds, median")


def run(args: argparse.Namespace, fxadapt: list[str], version: str) -> int:
    """The GPU mode; returns the exit status (1 when nothing could be measured)."""
    start = time.monotonic()
    device = "cuda" if args.device == "cuda" else "cpu"
    names = [v for v in args.variants if v in GPU_LABELS]
    print_header(args, device, version)
    why = why_not_here(device)
    if why:
        print("\n| variant | batch | mode | result |\n|---|---|---|---|")
        for variant in names:
            print(f"| {GPU_LABELS[variant]} | all | all | not available: {why} |")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity at 1e-5 needs full fp32 products
    torch.backends.cudnn.allow_tf32 = False
    for limit in ("cache_size_limit", "recompile_limit"):  # one code object (BertModel.forward) per model
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    root = args.workdir / ("small" if args.small else "bert-base")
    print(f"\nModels and adapters under {root}: {'built now' if build_all(root, args.small) else 'cached'}")
    workers = max(1, min(4, (os.cpu_count() or 1) // 4))
    print(f"fxadapt .pt2 graphs ({workers} compiles at a time; cached for this spec and source):", flush=True)
    with ThreadPoolExecutor(workers) as pool:
        pt2 = dict(zip(["base", *names], pool.map(
            lambda v: compile_variant(FX_OF.get(v, v), root, fxadapt, fmt="pt2"), ["base", *names]), strict=True))
    bench = GpuBench(args, device, root)
    for variant, path in pt2.items():
        bench.load(variant, path)
        print(f"  {variant:<10} {path if isinstance(path, str) else 'loaded'}")
    if ("base",) in bench.missing:
        return 1
    ready = ["base", *(v for v in names if (v,) not in bench.missing)]
    parity(bench, ready)
    if "compile" in args.modes:
        compile_all(bench, ready, start + args.budget_s)
    else:
        bench.missing.update({(v, b, "compile"): "--modes eager" for v in ready for b in args.batches})
    keys = [(s, v, b, m) for v in ready for b in args.batches for m in args.modes for s in ("fx", "ref")
            if not row_missing(bench, v, b, m) or v == "base"]
    keys = [k for k in keys if (k[1], k[2], k[3]) not in bench.missing]
    print(f"\nTiming {len(keys)} callables x {args.reps} interleaved rounds (fp16) ...", flush=True)
    print_table(bench, names, time_interleaved(bench, keys, args.reps))
    print(f"\n(total {time.monotonic() - start:.0f} s)")
    return 0
