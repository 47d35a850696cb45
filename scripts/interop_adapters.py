"""Interop check: adapters trained and saved by fxadapt load into AdapterHub `adapters` 1.3.0 (and LoRA into
PEFT) and give the same outputs.

    python scripts/interop_adapters.py                    # both steps: save here, check with /work/refvenv
    python scripts/interop_adapters.py save DIR           # fxadapt venv: train a few steps, save, record outputs
    /work/refvenv/bin/python scripts/interop_adapters.py check DIR   # reference venv: load, run, compare

The save step trains each adapter for a few SGD steps on random data (so no weight is at its
initial value), saves it with `AdaptedModel.save_adapter` and writes the inputs and fxadapt's outputs
to DIR/io.safetensors. The check step loads every adapter into the reference with its plain default
calls (`load_adapter(DIR)`, which reads `pytorch_adapter.bin`; PEFT: `PeftModel.from_pretrained(model,
DIR/peft)`), recomputes the three `average_adapter` strategies inside `adapters` from the two saved
inputs, loads the composition cases' adapters (and their fusion, `load_adapter_fusion(DIR)`) and
activates the same block there, and prints the max abs error per case; it exits 1 above the tolerance
(1e-5). Base models are the tiny reference fixtures.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "fixtures" / "reference" / "models"
TOLERANCE = 1e-5
LORA_ALL = "lora[r=4,alpha=8,intermediate_lora=True,output_lora=True]"
AVERAGE_WEIGHTS = [2.0, -1.0]

# name -> (arch, config, head labels or None, kind); kind "adapter" also checks the PEFT layout for LoRA.
CASES: dict[str, tuple[str, str, int | None]] = {
    "bert_seq_bn": ("bert", "seq_bn", None),
    "bert_lora": ("bert", LORA_ALL, None),
    "bert_double_seq_bn_head": ("bert", "double_seq_bn", 3),
    "distilbert_lora": ("distilbert", "lora[r=4,alpha=16,attn_matrices=['q','k','v']]", None),
    "gpt2_lora_qv": ("gpt2", "lora[r=4,alpha=8]", None),
    "gpt2_seq_bn": ("gpt2", "seq_bn", None),
    "llama_lora": ("llama", LORA_ALL, None),
    "llama_seq_bn": ("llama", "seq_bn", None),
}
AVERAGES = {"linear": None, "lora_linear_only_negate_b": None, "lora_delta_w_svd": 3}
# Composition on BERT: name -> (adapters, setup in the spec's JSON form, how it trains). "fusion": the fusion and
# the adapters train together (train_adapter_fusion(..., unfreeze_adapters=True)); "adapters": train_adapter(setup).
COMPOSITIONS = {
    "fuse_bn": ({"fa": "seq_bn", "fb": "seq_bn[reduction_factor=8]"}, {"fuse": ["fa", "fb"]}, "fusion"),
    "stack_fuse_bn": ({"sa": "seq_bn", "sb": "seq_bn[reduction_factor=4,non_linearity='gelu']", "sc": "seq_bn"},
                      {"stack": [{"fuse": ["sa", "sb"]}, "sc"]}, "fusion"),
    "stack_lora": ({"la": "lora[r=4,alpha=8]", "lb": "lora[r=2,alpha=4,attn_matrices=['q','k']]"},
                   {"stack": ["la", "lb"]}, "adapters"),
}


def _inputs(arch: str):
    import torch

    gen = torch.Generator().manual_seed(sum(map(ord, arch)))
    ids = torch.randint(3, 100, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _train(model, name, seed: int, steps: int = 3, start=None) -> None:
    """A few SGD steps on random targets, so every saved weight differs from its initial value."""
    import torch

    (start or model.train_adapter)(name)
    gen = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(steps):
        ids = torch.randint(3, 100, (4, 7), generator=gen)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        if hasattr(out, "logits") and out.logits is not None:
            loss = torch.nn.functional.cross_entropy(out.logits, torch.randint(0, 3, (4,), generator=gen))
        else:
            loss = (out.last_hidden_state - torch.randn(out.last_hidden_state.shape, generator=gen)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():  # LoRA's B starts at zero and moves little in 3 steps: perturb everything as well
        for param in trainable:
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.eval()


def save(out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import fxadapt

    tensors, cases = {}, []
    captured: dict[str, fxadapt.AdaptedModel] = {}
    for index, (case, (arch, config, labels)) in enumerate(CASES.items()):
        model = fxadapt.adapt(str(MODELS / arch)) if arch not in captured else fxadapt.AdaptedModel(
            captured[arch].captured)
        captured.setdefault(arch, model)
        if f"{arch}.base" not in tensors:
            with torch.no_grad():  # no adapter active: shows below that each adapter changes the outputs
                tensors[f"{arch}.base"] = model(**_inputs(arch)).last_hidden_state.contiguous()
        model.add_adapter(case, config)
        if labels:
            model.add_classification_head(case, num_labels=labels)
        _train(model, case, seed=index)
        model.set_active_adapters(case)
        layouts = model.save_adapter(out_dir / case, case)
        inputs = _inputs(arch)
        with torch.no_grad():
            out = model(**inputs)
        field = "logits" if labels else "last_hidden_state"
        tensors[f"{case}.out"] = getattr(out, field).contiguous()
        cases.append({"name": case, "arch": arch, "field": field, "layouts": layouts, "head": bool(labels)})
        for key, value in inputs.items():
            tensors[f"{arch}.{key}"] = value
    # average_adapter: two LoRAs on BERT, averaged by fxadapt; the check step averages them in `adapters`.
    model = fxadapt.AdaptedModel(captured["bert"].captured)
    for seed, name in enumerate(("avg_in_a", "avg_in_b")):
        model.add_adapter(name, LORA_ALL)
        _train(model, name, seed=100 + seed)
        model.save_adapter(out_dir / name, name, peft_layout=False)
    for strategy, svd_rank in AVERAGES.items():
        name = f"avg_{strategy}"
        model.average_adapter(name, ["avg_in_a", "avg_in_b"], weights=AVERAGE_WEIGHTS, combine_strategy=strategy,
                              svd_rank=svd_rank, set_active=True)
        with torch.no_grad():
            tensors[f"{name}.out"] = model(**_inputs("bert")).last_hidden_state.contiguous()
        cases.append({"name": name, "arch": "bert", "field": "last_hidden_state", "layouts": ["average"],
                      "strategy": strategy, "svd_rank": svd_rank, "inputs": ["avg_in_a", "avg_in_b"]})
    # Composition blocks: trained under the block, saved per adapter (+ the fusion), checked under the same block.
    for index, (case, (configs, setup, trains)) in enumerate(COMPOSITIONS.items()):
        model = fxadapt.AdaptedModel(captured["bert"].captured)
        for name, config in configs.items():
            model.add_adapter(name, config)
        fuses = _fuses(setup)
        for fuse in fuses:
            model.add_adapter_fusion(fuse)
        block = fxadapt.blocks.from_json(setup)
        start = functools.partial(model.train_adapter_fusion, unfreeze_adapters=True) if trains == "fusion" else None
        _train(model, block, seed=200 + index, start=start)
        for name in configs:
            model.save_adapter(out_dir / case / name, name, peft_layout=False)
        for fuse in fuses:
            model.save_adapter_fusion(out_dir / case / ("fusion_" + "_".join(fuse)), fuse)
        with torch.no_grad():
            tensors[f"{case}.out"] = model(**_inputs("bert")).last_hidden_state.contiguous()
        cases.append({"name": case, "arch": "bert", "field": "last_hidden_state", "layouts": ["composition"],
                      "adapters": list(configs), "setup": setup,
                      "fusions": ["fusion_" + "_".join(f) for f in fuses]})
    save_file(tensors, str(out_dir / "io.safetensors"))
    (out_dir / "cases.json").write_text(json.dumps(cases, indent=2))
    print(f"saved {len(cases)} cases to {out_dir}")


def _fuses(setup) -> list[list[str]]:
    """The adapter lists of the fuse blocks in a setup's JSON form."""
    if not isinstance(setup, dict):
        return []
    kind = next(iter(setup))
    found = [setup[kind]] if kind == "fuse" else []
    return found + [f for child in setup[kind] for f in _fuses(child)]


def _reference_block(setup):
    """The setup's JSON form as adapters.composition blocks."""
    from adapters import composition

    if isinstance(setup, str):
        return setup
    kind = next(iter(setup))
    classes = {"stack": composition.Stack, "fuse": composition.Fuse, "parallel": composition.Parallel,
               "average": composition.Average}
    return classes[kind](*[_reference_block(c) for c in setup[kind]])


def _reference_output(case: dict, layout: str, directory: Path, inputs: dict):
    import adapters
    import torch
    import transformers

    model_dir = MODELS / case["arch"]
    if layout == "peft":
        import peft

        base = transformers.AutoModel.from_pretrained(model_dir).eval()
        model = peft.PeftModel.from_pretrained(base, directory / case["name"] / "peft").eval()
    elif case.get("head"):
        model = adapters.AutoAdapterModel.from_pretrained(model_dir).eval()
        name = model.load_adapter(str(directory / case["name"]))
        model.set_active_adapters(name)
    else:
        model = transformers.AutoModel.from_pretrained(model_dir).eval()
        adapters.init(model)
        if layout == "composition":
            for name in case["adapters"]:
                model.load_adapter(str(directory / case["name"] / name))
            for fusion in case["fusions"]:
                model.load_adapter_fusion(str(directory / case["name"] / fusion))
            model.set_active_adapters(_reference_block(case["setup"]))
        elif layout == "average":
            for name in case["inputs"]:
                model.load_adapter(str(directory / name))
            model.average_adapter("avg", case["inputs"], weights=AVERAGE_WEIGHTS, combine_strategy=case["strategy"],
                                  svd_rank=case["svd_rank"])
            model.set_active_adapters("avg")
        else:
            model.set_active_adapters(model.load_adapter(str(directory / case["name"])))
    model.eval()
    with torch.no_grad():
        return getattr(model(**inputs), case["field"])


def check(directory: Path) -> int:
    import logging

    import adapters
    import transformers
    from safetensors.torch import load_file

    logging.getLogger("adapters").setLevel(logging.ERROR)  # "no adapter active" while loading: expected
    transformers.logging.set_verbosity_error()

    io = load_file(str(directory / "io.safetensors"))
    cases = json.loads((directory / "cases.json").read_text())
    print(f"adapters {adapters.__version__}: fxadapt-saved adapters in the reference; max abs error of the outputs, "
          "and the adapter's own effect on them (vs no adapter) for scale")
    worst = 0.0
    for case in cases:
        inputs = {k: io[f"{case['arch']}.{k}"] for k in ("input_ids", "attention_mask")}
        for layout in [x for x in case["layouts"] if x != "head"]:
            got = _reference_output(case, layout, directory, inputs)
            error = (got - io[f"{case['name']}.out"]).abs().max().item()
            worst = max(worst, error)
            tag = "ok " if error <= TOLERANCE else "BAD"
            ours, base = io[case["name"] + ".out"], io[case["arch"] + ".base"]
            effect = "" if case.get("head") else f"effect {(ours - base).abs().max().item():.2e}"
            print(f"  [{tag}] {case['name']:<30} {layout:<11} {case['field']:<18} error {error:.3e}  {effect}")
    print(f"max abs error {worst:.3e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?", choices=("save", "check", "both"), default="both")
    parser.add_argument("directory", nargs="?", type=Path)
    parser.add_argument("--ref-python", default="/work/refvenv/bin/python",
                        help="interpreter with adapters 1.3.0 and peft, for the check step")
    args = parser.parse_args(argv)
    if args.step == "save":
        args.directory.mkdir(parents=True, exist_ok=True)
        save(args.directory)
        return 0
    if args.step == "check":
        return check(args.directory)
    with tempfile.TemporaryDirectory(prefix="fxadapt-interop-") as tmp:
        directory = args.directory or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        save(directory)
        return subprocess.run([args.ref_python, __file__, "check", str(directory)]).returncode


if __name__ == "__main__":
    sys.exit(main())
