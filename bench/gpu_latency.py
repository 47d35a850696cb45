"""Inference latency of adapter variants against the base model, measured side by side in one run.

BERT-base-sized (random init), fp16 on CUDA (fp32 on CPU), batch x seq inputs; eager and
torch.compile. Variants: the Hugging Face model, its captured graph, fxadapt LoRA (q, v, r=8)
unmerged and merged, fxadapt seq_bn. Prints median latency and the ratio to the base graph.

    python bench/gpu_latency.py [--layers 12 --hidden 768 --batch 32 --seq 128] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from fxadapt.capture import capture, flatten_outputs
from fxadapt.pipeline import build, optimize
from fxadapt.spec import parse_spec


def timed(fn, inputs, iters: int, device: str) -> float:
    with torch.no_grad():
        for _ in range(10):
            fn(**inputs)
        samples = []
        for _ in range(iters):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(**inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    config = transformers.BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval().to(device, dtype)
    inputs = {"input_ids": torch.randint(1, config.vocab_size, (args.batch, args.seq), device=device),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device)}

    variants = {"hf_eager_model": model, "base_graph": capture(model, inputs).module}
    for label, text, merge in (("lora_unmerged", "lora[r=8,alpha=16,init_weights='bert']", False),
                               ("lora_merged", "lora[r=8,alpha=16,init_weights='bert']", True),
                               ("seq_bn", "seq_bn", False)):
        spec = parse_spec({"adapters": {"a": text}, "optimize": {"merge_lora": merge}})
        torch.manual_seed(1)  # the same adapter weights in the merged and unmerged variants
        result = build(model, spec, example_inputs=inputs)
        result.graph.to(device, dtype)
        optimize(result, spec)
        variants[label] = result.graph
    with torch.no_grad():
        ref = flatten_outputs(variants["lora_unmerged"](**inputs))[0].float()
        merged = flatten_outputs(variants["lora_merged"](**inputs))[0].float()
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, {dtype}, torch {torch.__version__}, "
          f"BERT {args.layers}x{args.hidden}, batch {args.batch} x seq {args.seq}; "
          f"merged vs unmerged LoRA max abs diff {(ref - merged).abs().max().item():.2e}")
    modes = [("eager", lambda m: m)] + ([] if args.no_compile else [("compile", torch.compile)])
    for mode, wrap in modes:
        times = {}
        for label, module in variants.items():
            start = time.perf_counter()
            fn = wrap(module)
            times[label] = timed(fn, inputs, args.iters, device)
            setup = time.perf_counter() - start
            print(f"  {mode:<8} {label:<16} {times[label]:8.3f} ms  (incl. warm-up {setup:5.1f}s)", flush=True)
        base = times["base_graph"]
        print(f"  {mode} ratio to base graph: " + ", ".join(f"{k} {v / base:.3f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
