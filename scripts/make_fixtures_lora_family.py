"""Generate the LoRA-family reference fixtures: `adapters` 1.3.0 (IA3, VeRA, DoRA, gated LoRA) and PEFT LoRA.

Same layout as scripts/make_reference_fixtures.py (whose helpers this imports; see docs/fixtures.md):
tests/fixtures/reference/cases/<arch>__<method>/{adapter/, case.json, io.safetensors}, on the saved
tiny base models in tests/fixtures/reference/models/. For PEFT cases `adapter/` is the unmodified
`PeftModel.save_pretrained` output (adapter_config.json + adapter_model.safetensors).

Run from the repository root in the reference environment (transformers 4.57.6, adapters 1.3.0,
peft 0.21.2); only the cases listed here are rewritten, the models and other cases are untouched::

    /work/refvenv/bin/python scripts/make_fixtures_lora_family.py --out tests/fixtures/reference
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import make_reference_fixtures as ref
import peft
import safetensors.torch
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

# (arch, case method) -> adapters config string. Scalings differ from 1 where the variant has one.
ADAPTER_CASES: dict[tuple[str, str], str] = {
    ("bert", "ia3"): "ia3[alpha=2]",
    ("llama", "ia3"): "ia3",
    ("gpt2", "ia3"): "ia3",
    ("bert_seqcls", "vera"): "vera[r=4,alpha=8]",  # bare models lose VeRA's shared A/B on save (a reference bug)
    ("bert_seqcls", "dvora"): "dvora[r=4,alpha=32,attn_matrices=['q','k','v']]",
    ("bert", "dora"): "lora[r=4,alpha=16,use_dora=True,output_lora=True]",
    ("llama", "dora"): "lora[r=4,alpha=8,use_dora=True,intermediate_lora=True]",
    ("bert", "lora_gating"): "lora[r=4,alpha=8,use_gating=True,intermediate_lora=True]",
    ("llama", "lora_gating"): "lora[r=4,alpha=8,use_gating=True]",
    ("gpt2", "lora_gating"): "lora[r=4,alpha=8,use_gating=True,intermediate_lora=True]",
    ("bert", "ia3_gating"): "ia3[use_gating=True]",
    ("gpt2", "ia3_gating"): "ia3[use_gating=True]",
}

# (arch, case method) -> PEFT LoraConfig keyword arguments.
PEFT_CASES: dict[tuple[str, str], dict[str, Any]] = {
    ("bert", "peft_lora"): dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    ("bert", "peft_rslora"): dict(r=4, lora_alpha=8, use_rslora=True, layers_to_transform=[1],
                                  target_modules=["key", "intermediate.dense", "output.dense"],
                                  rank_pattern={"intermediate.dense": 2}, alpha_pattern={"key": 16}),
    ("bert", "peft_dora"): dict(r=4, lora_alpha=16, use_dora=True, target_modules=r".*\.(query|value|dense)",
                                exclude_modules=["pooler.dense"]),
    ("bert", "peft_all_linear"): dict(r=4, lora_alpha=8, target_modules="all-linear", bias="all"),
    ("llama", "peft_lora"): dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    ("llama", "peft_rslora"): dict(r=8, lora_alpha=8, use_rslora=True, target_modules=r".*\.(k_proj|o_proj|down_proj)"),
    ("llama", "peft_dora"): dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "gate_proj"]),
    ("llama", "peft_all_linear"): dict(r=4, lora_alpha=8, target_modules="all-linear"),
    ("gpt2", "peft_lora"): dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    ("gpt2", "peft_rslora"): dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["c_attn", "c_fc"],
                                  fan_in_fan_out=True, bias="lora_only"),
    ("gpt2", "peft_dora"): dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "mlp.c_proj"],
                                fan_in_fan_out=True),
    ("gpt2", "peft_all_linear"): dict(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True),
    ("bert_seqcls", "peft_all_linear"): dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"),
}


def make_peft_case(arch: str, method: str, model_dir: Path, case_dir: Path) -> dict[str, Any]:
    """Build, perturb, save, reload-check and dump one PEFT case; returns case.json content."""
    cls, _, fields = ref.ARCHS[arch]
    kwargs = PEFT_CASES[(arch, method)]
    case = f"{arch}__{method}"

    base = ref.load_base(arch, model_dir)
    inputs = ref.make_inputs(arch, base.config)
    out_base = ref.run(base, inputs, fields)

    model = get_peft_model(ref.load_base(arch, model_dir), LoraConfig(**kwargs))
    gen = torch.Generator().manual_seed(ref.seed_for("adapter/" + case))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in trainable:  # perturb everything the checkpoint holds (LoRA B starts at zero)
        p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2
    model.eval()
    out = ref.run(model, inputs, fields)
    for f in fields:
        diff = (out[f] - out_base[f]).abs().max().item()
        assert diff > 1e-3, f"{case}: adapter output equals base output for {f} (max diff {diff})"

    adapter_dir = case_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink()  # a generated model card naming local paths; not part of the checkpoint
    _stable_config(adapter_dir)
    state = safetensors.torch.load_file(adapter_dir / "adapter_model.safetensors")
    assert len(state) == len(trainable), f"{case}: saved {len(state)} tensors, trained {len(trainable)}"

    fresh = PeftModel.from_pretrained(ref.load_base(arch, model_dir), str(adapter_dir)).eval()
    out_reload = ref.run(fresh, inputs, fields)
    for f in fields:
        assert torch.equal(out_reload[f], out[f]), f"{case}: reloaded adapter gives different {f}"

    tensors = dict(inputs)
    tensors.update({f"out.{f}": t for f, t in out.items()})
    tensors.update({f"out_base.{f}": t for f, t in out_base.items()})
    safetensors.torch.save_file(tensors, case_dir / "io.safetensors")
    return {
        "arch": arch,
        "model_class": cls.__name__,
        "adapter_name": "default",
        "method": method,
        "config": kwargs,
        "outputs": fields,
        "weights_file": "adapter_model.safetensors",
        "attn_implementation": model.config._attn_implementation,
        "adapter_keys": [
            {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in sorted(state.items())
        ],
        "head_keys": [],
        "versions": {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }


def _stable_config(adapter_dir: Path) -> None:
    """PEFT writes the absolute base-model path and an unordered target set; make the file reproducible."""
    file = adapter_dir / "adapter_config.json"
    data = json.loads(file.read_text())
    data["base_model_name_or_path"] = None
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    if isinstance(data.get("modules_to_save"), list):
        data["modules_to_save"] = sorted(data["modules_to_save"])
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/reference"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # bit-reproducible reductions
    logging.getLogger("adapters.model_mixin").setLevel(logging.ERROR)
    torch.use_deterministic_algorithms(True)

    models_root, cases_root = args.out / "models", args.out / "cases"
    jobs = [(arch, method, False) for arch, method in ADAPTER_CASES] + [(a, m, True) for a, m in PEFT_CASES]
    for arch, method, is_peft in jobs:
        case_dir = cases_root / f"{arch}__{method}"
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        if is_peft:
            meta = make_peft_case(arch, method, models_root / arch, case_dir)
        else:
            ref.METHODS[method] = ADAPTER_CASES[(arch, method)]  # make_case reads its config string from here
            meta = ref.make_case(arch, method, models_root / arch, case_dir)
        text = re.sub(r"\{[^{}\[\]]*\[[^\]]*\][^{}]*\}", ref._one_line, json.dumps(meta, indent=2))
        (case_dir / "case.json").write_text(text + "\n")
        print(f"{case_dir.name}: {len(meta['adapter_keys'])} adapter tensors")


if __name__ == "__main__":
    main()
