"""fxadapt's ONNX Runtime graphs against the reference eager models, on the same saved weights, timed in one
process (issue #11, item 4).

Run with the reference venv's python (adapters 1.3.0, PEFT 0.21.2, onnxruntime); fxadapt compiles by
subprocess with the main environment's `fxadapt` CLI:

    /work/refvenv/bin/python bench/side_by_side.py [--small] [--reps 20] [--threads N] [--only seq_bn,fuse]

1. builds a random-init BERT (BertConfig defaults, seeded; --small: 2 x 128) and its adapters with
   adapters 1.3.0 (seq_bn, LoRA, two seq_bn + an AdapterFusion) and PEFT (64 LoRAs), every parameter
   perturbed, and saves them (bench/_reference_models.py);
2. compiles each variant's spec (pointing at those directories) with `fxadapt compile --format onnx`
   (bench/_fxadapt_side.py); everything is cached under --workdir, so a re-run builds and compiles nothing;
3. prints the parity (max abs error vs the reference) of every pair and stops if one exceeds 1e-5;
4. times, interleaved (shuffled round-robin, --reps rounds, median), the reference eager models, the HF base
   model, fxadapt's ONNX sessions and fxadapt's base ONNX, and prints the ratio table (docs/performance.md).

`--device cuda` is the GPU mode (bench/_gpu_side.py; bench/gpu_side_by_side.sh prepares a GPU machine and
runs it in one call): fxadapt's .pt2 graphs in PyTorch vs the reference eager models, eager and under
torch.compile, fp16, batch 1 and 32 x 128.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _gpu_side
import numpy as np
import torch
import transformers

try:  # the CPU mode's stack; on a GPU machine it may be missing, and --device cuda reports that per row
    import adapters
    import onnxruntime as ort
    import peft
    from _fxadapt_side import REPO, compile_variant, feed_for, graph_summary, run_session, session, source_digest
    from _reference_models import build_all, load_reference, routed_names
except ImportError as missing_stack:
    STACK_MISSING = str(missing_stack)
    REPO = Path(__file__).resolve().parents[1]
else:
    STACK_MISSING = ""

LABELS = {
    "seq_bn": "seq_bn",
    "lora": "LoRA r=8 on q,v,intermediate,output (unmerged)",
    "lora_merged": "LoRA merged",
    "fuse": "Fuse(2 x seq_bn) (AdapterFusion)",
    "parallel": "Parallel(2 x seq_bn) / two base runs",
    "route8": "8 LoRAs routed per row (MultiTask) vs PEFT adapter_names",
    "route64": "64 LoRAs routed per row (MultiTask) vs PEFT adapter_names",
}
REFERENCE_OF = {"lora_merged": "lora"}  # the merged graph is compared with (and timed against) unmerged LoRA
BASE_RUNS = {"parallel": 2}  # Parallel doubles the batch: its ratio is to two base runs
MAIN_SHAPE = (4, 128)
ROUTE_BATCH, ROUTE_SEQS = 8, (64, 128)
PARITY_LIMIT = 1e-5
OUTPUTS = ("last_hidden_state", "pooler_output")


@dataclass
class Row:
    """One table row: a variant at one input shape; `missing` says why it cannot be measured."""

    variant: str
    batch: int
    seq: int
    missing: str = ""

    @property
    def label(self) -> str:
        shape = f", b{self.batch} x {self.seq}" if self.variant.startswith("route") else ""
        return LABELS[self.variant] + shape

    @property
    def ref(self) -> str:
        return REFERENCE_OF.get(self.variant, self.variant)

    def keys(self) -> tuple[tuple, tuple, tuple, tuple]:
        """Timing keys: fxadapt, fxadapt base, reference, reference base."""
        shape = (self.batch, self.seq)
        return ("fx", self.variant, *shape), ("fx", "base", *shape), ("ref", self.ref, *shape), ("ref", "base", *shape)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="2 layers x 128 hidden, for quick checks")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fxadapt_bench"), help="cache of models/graphs")
    parser.add_argument("--reps", type=int, default=20, help="timed rounds over all variants (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads and ORT intra_op_num_threads (default: torch's)")
    parser.add_argument("--only", default="", help=f"comma list of variants ({', '.join(LABELS)}); default all")
    parser.add_argument("--no-parity-stop", action="store_true", help="time even if a pair differs by > 1e-5")
    parser.add_argument("--fxadapt", default="fxadapt", help="the main environment's fxadapt command")
    parser.add_argument("--ort-no-spin", action="store_true",
                        help="ORT session.intra_op.allow_spinning=0 (default SessionOptions spin after each run)")
    gpu = parser.add_argument_group("GPU mode (--device cuda; cpu-check runs its code on the CPU)")
    gpu.add_argument("--device", choices=("cpu", "cuda", "cpu-check"), default="cpu",
                     help="cpu: ONNX Runtime vs eager (default); cuda: .pt2 in PyTorch vs eager, fp16")
    gpu.add_argument("--batches", default="1,32", help="GPU mode: batch sizes at 128 tokens (default 1,32)")
    gpu.add_argument("--modes", default="eager,compile", help="GPU mode: eager, compile (torch.compile) or both")
    gpu.add_argument("--budget-s", type=float, default=480.0,
                     help="GPU mode: no torch.compile starts after this many seconds; those rows say so")
    args = parser.parse_args()
    labels = LABELS if args.device == "cpu" else _gpu_side.GPU_LABELS
    args.variants = [v for v in args.only.split(",") if v] or list(labels)
    unknown = [v for v in args.variants if v not in labels]
    if unknown:
        parser.error(f"unknown variants {unknown} for --device {args.device}; choose from {', '.join(labels)}")
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= set(_gpu_side.MODES) or not args.modes:
        parser.error(f"--modes: a comma list of {', '.join(_gpu_side.MODES)}")
    return args


def make_inputs(batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * batch + seq)
    return {"input_ids": torch.randint(1, vocab, (batch, seq), generator=gen),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def route_ids(batch: int, count: int) -> list[int]:
    """Row r uses adapter (r * count) // batch: all 8 of 8, every 8th of 64."""
    return [r * count // batch for r in range(batch)]


class Bench:
    """The models, sessions and per-shape inputs of one run, and a callable per timing key."""

    def __init__(self, root: Path, threads: int, vocab: int, spin: bool) -> None:
        self.root, self.threads, self.vocab, self.spin = root, threads, vocab, spin
        self.refs: dict[str, torch.nn.Module] = {}
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.calls: dict[tuple, Callable[[], dict[str, np.ndarray]]] = {}

    def add_reference(self, variant: str) -> None:
        if variant not in self.refs:
            self.refs[variant] = load_reference(self.root, variant)

    def add_session(self, variant: str, onnx: Path) -> None:
        self.sessions[variant] = session(onnx, self.threads, self.spin)

    def call(self, key: tuple) -> Callable[[], dict[str, np.ndarray]]:
        """The callable behind a timing key, made once per key (its inputs are built here, not timed)."""
        if key not in self.calls:
            side, variant, batch, seq = key
            inputs = make_inputs(batch, seq, self.vocab)
            count = int(variant.removeprefix("route")) if variant.startswith("route") else 0
            ids = route_ids(batch, count) if count else []
            if side == "fx":
                arrays = {k: v.numpy() for k, v in inputs.items()} | {"task_ids": np.array(ids, dtype=np.int64)}
                sess = self.sessions[variant]
                feed = feed_for(sess, arrays)
                self.calls[key] = lambda: run_session(sess, feed)
            else:
                model = self.refs[variant]
                extra = {"adapter_names": [routed_names(count)[i] for i in ids]} if count else {}
                self.calls[key] = lambda: _eager(model, inputs, extra)
        return self.calls[key]


@torch.no_grad()
def _eager(model: torch.nn.Module, inputs: dict[str, torch.Tensor], extra: dict) -> dict[str, np.ndarray]:
    out = model(**inputs, **extra)
    return {name: getattr(out, name).numpy() for name in OUTPUTS}


def max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    errors = []
    for name in OUTPUTS:
        if got[name].shape != want[name].shape:
            raise ValueError(f"{name}: fxadapt shape {got[name].shape} != reference {want[name].shape}")
        errors.append(float(np.abs(got[name].astype(np.float64) - want[name]).max()))
    return max(errors)


def effect(adapted: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> float:
    """Max |adapted - base| over the base rows repeated (Parallel repeats the batch): 0 means identity."""
    a, b = adapted["last_hidden_state"], base["last_hidden_state"]
    return float(np.abs(a - np.tile(b, (a.shape[0] // b.shape[0], 1, 1))).max())


def check_parity(bench: Bench, rows: list[Row]) -> float:
    """Print the parity of every fxadapt/reference pair (and each base pair); mark rows that cannot run."""
    worst, seen = 0.0, set()
    print(f"\nParity: max abs error of fxadapt ONNX Runtime vs the reference eager output (limit {PARITY_LIMIT:g})")
    for row in rows:
        fx, fx_base, ref, ref_base = row.keys()
        pairs = [("base", fx_base, ref_base), (row.variant, fx, ref)] if fx_base not in seen else [
            (row.variant, fx, ref)]
        seen.add(fx_base)
        for name, fx_key, ref_key in pairs:
            try:
                got = bench.call(fx_key)()
            except Exception as err:  # noqa: BLE001 - a graph that cannot run this shape is reported, not fatal
                row.missing = f"ONNX Runtime failed at {row.batch}x{row.seq}: {' '.join(str(err).split())[:200]}"
                print(f"  [n/a ] {name:<12} {row.batch}x{row.seq}: {row.missing}")
                continue
            want = bench.call(ref_key)()
            try:
                error = max_error(got, want)
            except ValueError as mismatch:
                print(f"  [FAIL] {name:<12} {row.batch}x{row.seq}: {mismatch}")
                worst = float("inf")
                continue
            worst = max(worst, error)
            moved = "" if name == "base" else f"; effect vs base {effect(want, bench.call(ref_base)()):.3g}"
            flag = "ok" if error <= PARITY_LIMIT else "FAIL"
            print(f"  [{flag:>4}] {name:<12} {row.batch}x{row.seq}: max abs {error:.2e} (vs {ref_key[1]}){moved}")
    return worst


def time_interleaved(calls: dict[tuple, Callable], reps: int, warmup: int = 2) -> dict[tuple, list[float]]:
    """Seconds per key and round; every round runs every key once, in a fresh shuffled order (seeded), so a
    load change on the machine hits all variants alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict[tuple, list[float]] = {k: [] for k in calls}
    order, rng = list(calls), random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for key in order:
            start = time.perf_counter()
            calls[key]()
            samples[key].append(time.perf_counter() - start)
    return samples


def paired_ratio(num: list[float], den: list[float], runs: int = 1) -> str:
    """Median and quartiles of the per-round ratios num / (runs * den): the two ran in the same round,
    seconds apart, so a load change that spans rounds cancels in each ratio (the column beside the ratio
    of medians, to show how much of a difference is the machine's drift)."""
    ratios = sorted(a / (runs * b) for a, b in zip(num, den, strict=True))
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.3f}"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f} [{q1:.3f}-{q3:.3f}]"


def print_table(rows: list[Row], samples: dict[tuple, list[float]]) -> None:
    t = {k: statistics.median(v) for k, v in samples.items()}
    print("\n| variant | fxadapt ORT / fxadapt base ORT | reference eager / its base | speed-up over reference eager "
          "| fxadapt ms | reference ms | fxadapt / base per round: median [quartiles] |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row.missing:
            print(f"| {row.label} | not available: {row.missing} | | | | | |")
            continue
        fx, fx_base, ref, ref_base = row.keys()
        runs = BASE_RUNS.get(row.variant, 1)
        ref_ratio = "—" if row.variant in REFERENCE_OF else f"{t[ref] / (runs * t[ref_base]):.3f}"
        print(f"| {row.label} | {t[fx] / (runs * t[fx_base]):.3f} | {ref_ratio} | {t[ref] / t[fx]:.2f}x "
              f"| {t[fx] * 1e3:.2f} | {t[ref] * 1e3:.2f} | {paired_ratio(samples[fx], samples[fx_base], runs)} |")
    for shape in sorted({(r.batch, r.seq) for r in rows}):
        fx_base, ref_base = ("fx", "base", *shape), ("ref", "base", *shape)
        if fx_base in t and ref_base in t:
            print(f"\nBase at {shape[0]}x{shape[1]}: fxadapt ORT {t[fx_base] * 1e3:.2f} ms, HF eager "
                  f"{t[ref_base] * 1e3:.2f} ms (ORT / eager {t[fx_base] / t[ref_base]:.3f})", end="")
    print()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def fxadapt_version() -> str:
    """The checkout's commit (+ "with local changes" when fxadapt/ or passes/ differ from it) and the
    digest that keys the compiled-graph cache."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "fxadapt", "passes"], capture_output=True,
                           text=True, check=False)
    commit = head.stdout.strip() or "unknown commit"
    digest = "?" if STACK_MISSING else source_digest()
    return f"{commit}{' with local changes' if dirty.stdout.strip() else ''} (source {digest})"


def print_machine(args: argparse.Namespace, size: str) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpus = f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load {os.getloadavg()[0]:.2f}"
    print(f"side_by_side {now}; {cpu_name()}, {platform.system()} {platform.release()}; {cpus}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, transformers {transformers.__version__}, "
          f"adapters {adapters.__version__}, peft {peft.__version__}; threads {args.threads} (torch and ORT "
          f"intra-op{', ORT no spinning' if args.ort_no_spin else ''}); {size}; {args.reps} interleaved rounds, "
          "median; fp32")
    print(f"fxadapt {fxadapt_version()}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        sys.exit(_gpu_side.run(args, shlex.split(args.fxadapt), fxadapt_version()))
    if STACK_MISSING:
        sys.exit(f"the reference stack is not importable ({STACK_MISSING}): run with /work/refvenv/bin/python")
    root = args.workdir / ("small" if args.small else "bert-base")
    size = "BERT 2 x 128 (--small)" if args.small else "BERT-base 12 x 768 (random init)"
    print_machine(args, size)
    print(f"\nModels and adapters under {root}: ", end="", flush=True)
    print("built now" if build_all(root, args.small) else "cached")
    vocab = transformers.BertConfig.from_pretrained(str(root / "base")).vocab_size
    bench = Bench(root, args.threads, vocab, spin=not args.ort_no_spin)

    fxadapt = shlex.split(args.fxadapt)
    print("fxadapt graphs (compiled now, or cached for this spec and source):", flush=True)
    base_onnx = compile_variant("base", root, fxadapt)
    if isinstance(base_onnx, str):
        sys.exit(f"fxadapt base graph: {base_onnx}")
    bench.add_session("base", base_onnx)
    print(f"  {'base':<12} {graph_summary(base_onnx)}")
    bench.add_reference("base")
    rows: list[Row] = []
    for variant in args.variants:
        routed = variant.startswith("route")
        shapes = [(ROUTE_BATCH, s) for s in ROUTE_SEQS] if routed else [MAIN_SHAPE]
        onnx = compile_variant(variant, root, fxadapt)
        missing = onnx if isinstance(onnx, str) else ""
        if not missing:
            print(f"  {variant:<12} {graph_summary(onnx)}")
            bench.add_session(variant, onnx)
            bench.add_reference(REFERENCE_OF.get(variant, variant))
        rows += [Row(variant, b, s, missing) for b, s in shapes]
        if missing:
            print(f"  {variant}: not available: {missing}")

    worst = check_parity(bench, [r for r in rows if not r.missing])
    if worst > PARITY_LIMIT and not args.no_parity_stop:
        sys.exit(f"\nparity: max abs error {worst:.2e} exceeds {PARITY_LIMIT:g} (--no-parity-stop to time anyway)")
    keys = {k for r in rows if not r.missing for k in r.keys()}
    print(f"\nTiming {len(keys)} callables x {args.reps} interleaved rounds ...", flush=True)
    times = time_interleaved({k: bench.call(k) for k in sorted(keys)}, args.reps)
    print_table(rows, times)


if __name__ == "__main__":
    main()
