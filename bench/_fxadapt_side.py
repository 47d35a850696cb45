"""The fxadapt side of bench/side_by_side.py: a spec per variant pointing at the saved reference
directories, compiled to ONNX (or .pt2, for the GPU mode) by the `fxadapt` CLI of the main environment (a
subprocess: fxadapt is not installed in the reference venv), and ONNX Runtime sessions over the results.

Compiled graphs are cached in ROOT/<format>/<variant>/ beside the spec they were compiled from and a digest
of the compiler's source (`bench_spec.json`); a changed spec, a changed fxadapt (fxadapt/, passes/) or a
failed compile compiles again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from _reference_models import FUSED, routed_names

SPEC_COPY = "bench_spec.json"
REPO = Path(__file__).resolve().parents[1]  # the fxadapt checkout the main environment installs (editable)
_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}


def spec_for(variant: str, root: Path) -> dict[str, Any]:
    """The fxadapt spec of a variant; "base" is a fresh LoRA merged into the weights: its B starts at zero,
    so the merged graph is the base model's graph with the base weights (parity against the HF base checks
    that)."""
    saved = root / "adapters"
    if variant == "base":
        return {"adapters": {"zero": "lora[r=8,alpha=16]"}, "active": "zero", "optimize": {"merge_lora": True}}
    if variant == "seq_bn":
        return {"adapters": {"seq_bn": {"load": str(saved / "seq_bn")}}, "active": "seq_bn"}
    if variant == "peft_lora":  # one PEFT LoRA, unmerged (the GPU mode's "PEFT LoRA" row)
        return {"adapters": {"t0": {"load": str(root / "peft" / "t0")}}, "active": "t0",
                "optimize": {"merge_lora": False}}
    if variant in ("lora", "lora_merged"):
        return {"adapters": {"lora": {"load": str(saved / "lora")}}, "active": "lora",
                "optimize": {"merge_lora": variant == "lora_merged"}}
    pair = {name: {"load": str(saved / name)} for name in FUSED}
    if variant == "fuse":
        return {"adapters": pair, "fusions": [{"adapters": list(FUSED), "load": str(saved / "fusion")}],
                "active": {"fuse": list(FUSED)}}
    if variant == "parallel":
        return {"adapters": pair, "active": {"parallel": list(FUSED)}}
    if variant.startswith("route"):
        names = routed_names(int(variant.removeprefix("route")))
        return {"adapters": {n: {"load": str(root / "peft" / n)} for n in names}, "active": {"multi_task": names},
                "optimize": {"merge_lora": False}}
    raise ValueError(f"no spec for variant {variant!r}")


def compile_variant(variant: str, root: Path, fxadapt: list[str], fmt: str = "onnx") -> Path | str:
    """The compiled model.<fmt> ("onnx" or "pt2") of a variant (cached), or why there is none (the CLI's
    message)."""
    spec = spec_for(variant, root)
    spec_text = json.dumps(spec, indent=1, sort_keys=True) + "\n"
    key_text = json.dumps({"spec": spec, "fxadapt_source": source_digest()}, indent=1, sort_keys=True) + "\n"
    out, artifact = root / fmt / variant, f"model.{fmt}"
    if (out / artifact).is_file() and (out / SPEC_COPY).is_file() and (out / SPEC_COPY).read_text() == key_text:
        return out / artifact
    spec_file = root / "specs" / f"{variant}.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(spec_text)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*fxadapt, "compile", str(root / "base"), "--spec", str(spec_file), "-o", str(out), "--format", fmt]
    print(f"  compiling {variant}: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return f"{fxadapt[0]!r} not found: run from the main environment's shell or pass --fxadapt"
    # Exit 3: verified above the CLI's --atol, artifacts kept; this script's own parity check judges it.
    if proc.returncode not in (0, 3) or not (out / artifact).is_file():
        return f"compile failed (exit {proc.returncode}): {_last_paragraph(proc.stderr or proc.stdout)}"
    if proc.returncode == 3:
        print(f"  note: {variant}: fxadapt's own verification was above its default --atol", flush=True)
    (out / SPEC_COPY).write_text(key_text)
    return out / artifact


def graph_summary(onnx: Path) -> str:
    """What fxadapt did to a graph, from its report.json: the passes that changed something, ONNX nodes."""
    try:
        report = json.loads((onnx.parent / "report.json").read_text())
    except (OSError, ValueError):
        return "(no report.json)"
    passes = ", ".join(f"{name} {count}" for name, count in report.get("passes", {}).items() if count)
    return f"passes: {passes or 'none'}; ONNX nodes {report.get('artifacts', {}).get('onnx', {}).get('nodes', '?')}"


def source_digest() -> str:
    """sha256 over the compiler's Python sources, so graphs compiled by an older fxadapt are not reused
    (the passes of issue #11 change the graphs without changing any spec)."""
    digest = hashlib.sha256()
    for path in sorted(p for folder in ("fxadapt", "passes") for p in (REPO / folder).rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _last_paragraph(text: str, limit: int = 300) -> str:
    paragraphs = [p.strip() for p in text.strip().split("\n\n") if p.strip()]
    last = " ".join(paragraphs[-1].split()) if paragraphs else "(no output)"
    return last if len(last) <= limit else last[:limit] + " ..."


def session(path: Path, threads: int, spin: bool = True) -> ort.InferenceSession:
    """Default SessionOptions (fp32, all graph optimizations), with intra-op threads = torch's threads.

    Without `spin`, ORT's idle intra-op threads block at once instead of spinning a while after each run:
    in an interleaved loop the spinning takes CPU from the eager call that follows."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feed_for(sess: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs the graph takes, by name, in the integer type it declares; extra ones (task_ids for a
    graph that does not route) are dropped, a missing one is an error."""
    graph_inputs = sess.get_inputs()
    missing = [i.name for i in graph_inputs if i.name not in inputs]
    if missing:
        raise KeyError(f"graph inputs {missing} not provided (have {sorted(inputs)})")
    return {i.name: inputs[i.name].astype(_NUMPY_TYPES.get(i.type, inputs[i.name].dtype)) for i in graph_inputs}


def run_session(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed), strict=True))
