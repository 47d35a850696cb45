"""Compile time of `fxadapt compile` (LoRA, to ONNX, verified) against a plain torch.export +
torch.onnx.export of the base model, for a 12-layer BERT-base-sized model (random init).

Both run in this process, one after the other, and the ratio is printed; run it on a quiet machine:
    python bench/compile_time.py [--layers 12] [--hidden 768]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

from fxadapt.capture import dynamic_shapes_for, input_names_for, make_inputs
from fxadapt.pipeline import compile_model
from fxadapt.spec import parse_spec


def bert(layers: int, hidden: int) -> torch.nn.Module:
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                     intermediate_size=4 * hidden, architectures=["BertModel"])
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def plain_export(model: torch.nn.Module, out: Path) -> float:
    start = time.perf_counter()
    names = input_names_for(model)
    inputs = make_inputs(names, model.config, 2, 8)
    ep = torch.export.export(model, (), inputs, dynamic_shapes=dynamic_shapes_for(names, model.config), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ep, (), dynamo=True, verbose=False).save(str(out / "base.onnx"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    args = parser.parse_args()
    model = bert(args.layers, args.hidden)
    spec = parse_spec({"adapters": {"a": "lora[r=8,alpha=16]"}})
    with tempfile.TemporaryDirectory() as tmp:
        base_s = plain_export(model, Path(tmp))
        start = time.perf_counter()
        result = compile_model(model, spec, Path(tmp) / "out", ("onnx",))
        fx_s = time.perf_counter() - start
    assert result.ok
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    print(f"BERT {args.layers}x{args.hidden}: plain torch.export + torch.onnx.export {base_s:.1f}s; "
          f"fxadapt compile (LoRA, ONNX, verified on 2 shapes) {fx_s:.1f}s; ratio {fx_s / base_s:.2f}x")
    print(f"  fxadapt stages: {stages}")


if __name__ == "__main__":
    main()
