"""Deployment artifacts vs the reference's eager model (issue #12): for seq_bn and LoRA adapters saved by
adapters 1.3.0 on a BERT-base-sized model (random init), fxadapt compiles model.onnx, model.opt.onnx
(--ort-optimize) and model.int8.onnx (--quantize int8), plus a --swappable model.onnx where that flag exists;
each runs in ONNX Runtime beside the `adapters` eager model with the same adapter. Prints parity first (max
abs error and cosine per artifact vs eager), then the times, interleaved in one process, as ratios.

Run with the reference venv; fxadapt runs in the main env through its CLI:

    /work/refvenv/bin/python bench/deploy.py [--small] [--reps 20] [--root DIR] [--fxadapt-python python]

`--small` (2 layers x 128) and a few reps are for checking the script; timings from a shared machine are
noise. A re-run reuses ROOT's saved model, adapters and compiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
import zlib
from pathlib import Path

import adapters
import numpy as np
import onnxruntime as ort
import torch
from adapters import LoRAConfig
from transformers import BertConfig, BertModel

KINDS = {"seq_bn": "seq_bn",
         "lora": LoRAConfig(r=8, alpha=16, attn_matrices=["q", "v"], intermediate_lora=True, output_lora=True)}
ARTIFACTS = {"onnx": "model.onnx", "opt": "model.opt.onnx", "int8": "model.int8.onnx"}
BATCH, SEQ = 4, 128


def build(root: Path, small: bool) -> None:
    """Save the random-init base and one perturbed adapter per kind (zero-initialised up-projections and LoRA
    B matrices would make every adapter an identity and hide a dropped one)."""
    if (root / "built.json").exists():
        return
    torch.manual_seed(0)
    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512) if (
        small) else BertConfig()
    model = BertModel(config).eval()
    model.save_pretrained(str(root / "base"))
    adapters.init(model)
    (root / "adapters").mkdir(parents=True, exist_ok=True)
    for kind, adapter_config in KINDS.items():
        model.add_adapter(kind, config=adapter_config)
        generator = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if f".{kind}." in name:
                    noise = torch.randn(p.shape, generator=generator)
                    p.copy_(noise * (0.5 / p.shape[-1] ** 0.5) if p.dim() >= 2 else p + 0.05 * noise)
        model.save_adapter(str(root / "adapters" / kind), kind)
    (root / "built.json").write_text(json.dumps({"small": small}))


def compile_all(root: Path, python: str) -> dict[str, dict[str, Path]]:
    """fxadapt compile per kind: onnx + opt + int8 in one run, and --swappable where the CLI has it."""
    help_text = subprocess.run([python, "-m", "fxadapt.cli", "compile", "--help"], capture_output=True,
                               text=True, check=True).stdout
    paths: dict[str, dict[str, Path]] = {}
    for kind in KINDS:
        spec = root / f"{kind}.json"
        spec.write_text(json.dumps({"adapters": {kind: {"load": str(root / "adapters" / kind)}}, "active": kind}))
        runs = {"": ["--ort-optimize", "--quantize", "int8"]}
        if "--swappable" in help_text:
            runs["swappable"] = ["--swappable"]
        for suffix, flags in runs.items():
            out = root / "out" / (f"{kind}_{suffix}" if suffix else kind)
            if not (out / "report.json").exists():
                print(f"compiling {kind} {' '.join(flags)} ...", flush=True)
                run = subprocess.run([python, "-m", "fxadapt.cli", "compile", str(root / "base"), "--spec",
                                      str(spec), "-o", str(out), "--format", "onnx", *flags], capture_output=True,
                                     text=True)
                if run.returncode not in (0, 3):  # 3: verification above tolerance, the report says where
                    raise SystemExit(f"fxadapt compile failed ({run.returncode}):\n{run.stderr[-3000:]}")
            report = json.loads((out / "report.json").read_text())
            if suffix:
                paths.setdefault(kind, {})[suffix] = out / "model.onnx"
            else:
                paths.setdefault(kind, {}).update({a: out / f for a, f in ARTIFACTS.items()})
                fused = report["artifacts"].get("onnx_opt", {}).get("ort_optimize", {})
                print(f"  {kind}: ort_optimize fused {fused}; report ok={report['ok']}")
    return paths


def reference(root: Path, kind: str) -> torch.nn.Module:
    model = BertModel.from_pretrained(str(root / "base")).eval()
    adapters.init(model)
    model.load_adapter(str(root / "adapters" / kind))
    model.set_active_adapters(kind)
    return model.eval()


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle ORT threads spin for a while after each run by default, stealing the cores from the eager model
    # timed next in the interleaved loop.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="2 layers x 128 (checks the script, not speed)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--root", type=Path, default=None, help="work directory (default /tmp/fxadapt_bench_deploy"
                        "[_small])")
    parser.add_argument("--fxadapt-python", default="python", help="the main env's python (fxadapt installed)")
    args = parser.parse_args()
    root = args.root or Path("/tmp/fxadapt_bench_deploy" + ("_small" if args.small else ""))
    root.mkdir(parents=True, exist_ok=True)
    build(root, args.small)
    paths = compile_all(root, args.fxadapt_python)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ // 2:] = 0
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    runners = {}
    print(f"\nparity vs the adapters 1.3.0 eager model, b{BATCH}x{SEQ}, last_hidden_state:")
    for kind, artifacts in paths.items():
        eager = reference(root, kind)
        with torch.no_grad():
            expected = eager(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        runners[(kind, "eager")] = lambda m=eager: m(input_ids=ids, attention_mask=mask)
        for name, path in artifacts.items():
            s = session(path)
            got = s.run(["last_hidden_state"], feed)[0]
            error = np.abs(got - expected).max()
            print(f"  {kind:<7} {name:<10} max abs {error:.2e}  cosine {cosine(got, expected):.6f}")
            runners[(kind, name)] = lambda s=s: s.run(None, feed)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    with torch.no_grad():
        for run in runners.values():  # warm-up
            run()
        for rep in range(args.reps):
            keys = list(runners)
            for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:  # rotate the order each rep
                start = time.perf_counter()
                runners[key]()
                times[key].append(time.perf_counter() - start)
    print(f"\ntimes (median of {args.reps}, interleaved; ratio = eager / artifact, > 1 is faster than eager):")
    for kind in paths:
        base = statistics.median(times[(kind, "eager")])
        print(f"  {kind:<7} eager      {1000 * base:8.1f} ms")
        for name in paths[kind]:
            t = statistics.median(times[(kind, name)])
            print(f"  {kind:<7} {name:<10} {1000 * t:8.1f} ms  {base / t:5.2f}x")


if __name__ == "__main__":
    main()
