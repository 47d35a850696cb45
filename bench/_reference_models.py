"""The reference side of bench/side_by_side.py: one random-init BERT and its adapters, built and saved with
adapters 1.3.0 and PEFT 0.21.2, and loaded back from those saved directories as eager models to time.

Runs in the reference venv only (/work/refvenv/bin/python); fxadapt is not imported here.

Layout under ROOT (a re-run finds `built.json` and builds nothing):
    base/                      BertModel.save_pretrained (random init, seeded)
    adapters/{seq_bn,lora,f1,f2}/   save_adapter output (every parameter perturbed)
    adapters/fusion/           save_adapter_fusion over f1, f2 (perturbed)
    peft/t0 .. peft/t63        PeftModel.save_pretrained, one LoRA per directory (perturbed)
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import adapters
import torch
from adapters import Fuse, LoRAConfig, Parallel
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertModel

FUSED = ("f1", "f2")
ROUTED = 64  # PEFT adapters saved; the 8-adapter routing uses the first 8
# PEFT's string target is a full-match regex: q, v, the FFN's intermediate.dense and output.dense
# (not attention.output.dense), the same places as the adapters LoRA below.
PEFT_TARGETS = r".*\.(query|value|intermediate\.dense|layer\.\d+\.output\.dense)"


def bert_config(small: bool) -> BertConfig:
    """BertConfig defaults (BERT-base: 12 x 768) or, with `small`, 2 layers x 128 for quick checks."""
    if small:
        return BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
    return BertConfig()


def lora_config() -> LoRAConfig:
    return LoRAConfig(r=8, alpha=16, attn_matrices=["q", "v"], intermediate_lora=True, output_lora=True)


def peft_lora_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS)


@torch.no_grad()
def perturb(params: list[tuple[str, torch.nn.Parameter]], seed: str) -> None:
    """Replace every matrix by N(0, (0.5/sqrt(fan_in))^2) draws and add N(0, 0.05^2) to every vector.

    LoRA B and up-projections start at zero and the fusion's value matrix at the identity, so unperturbed
    they would hide a wrong formula. The fan-in scaling keeps each adapter's update the size of its input,
    so 12 layers of it stay well conditioned in fp32 (parity is judged at 1e-5)."""
    gen = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    for _, p in sorted(params, key=lambda item: item[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.data = noise * (0.5 / p.shape[-1] ** 0.5) if p.dim() >= 2 else p.data + 0.05 * noise


def load_base(root: Path) -> BertModel:
    return BertModel.from_pretrained(str(root / "base")).eval()


def build_all(root: Path, small: bool) -> bool:
    """Build, perturb and save the base model and every adapter under `root`; False if already there."""
    marker = root / "built.json"
    if marker.exists():
        return False
    torch.manual_seed(0)
    BertModel(bert_config(small)).eval().save_pretrained(str(root / "base"))

    model = load_base(root)
    adapters.init(model)
    before = {n for n, _ in model.named_parameters()}
    model.add_adapter("seq_bn", config="seq_bn")
    model.add_adapter("lora", config=lora_config())
    for name in FUSED:
        model.add_adapter(name, config="seq_bn")
    model.add_adapter_fusion(Fuse(*FUSED))
    added = [(n, p) for n, p in model.named_parameters() if n not in before]
    perturb(added, "adapters")
    (root / "adapters").mkdir(parents=True, exist_ok=True)  # save_adapter makes only the last directory
    for name in ("seq_bn", "lora", *FUSED):
        model.save_adapter(str(root / "adapters" / name), name)
    model.save_adapter_fusion(str(root / "adapters" / "fusion"), list(FUSED))

    # Adapter "t0" is not PEFT's "default", so save_pretrained writes every adapter to peft/<name>/.
    peft_model = get_peft_model(load_base(root), peft_lora_config(), adapter_name="t0")
    for i in range(1, ROUTED):
        peft_model.add_adapter(f"t{i}", peft_lora_config())
    perturb([(n, p) for n, p in peft_model.named_parameters() if ".lora_" in n], "peft")
    peft_model.save_pretrained(str(root / "peft"))

    marker.write_text(json.dumps({"small": small, "adapters": adapters.__version__, "routed": ROUTED}) + "\n")
    return True


def routed_names(count: int) -> list[str]:
    return [f"t{i}" for i in range(count)]


def load_reference(root: Path, variant: str) -> torch.nn.Module:
    """The eager reference model of a variant, loaded from the saved directories (the same files fxadapt
    compiles): "base", "seq_bn", "lora", "fuse", "parallel", or "route<N>" (PEFT with N adapters)."""
    # adapters warns "none are activated" while loading, before set_active_adapters; a forward pass that
    # warns later (in the parity check or timing) would mean a real problem, so only loading is quiet.
    mixin_log = logging.getLogger("adapters.model_mixin")
    level = mixin_log.level
    mixin_log.setLevel(logging.ERROR)
    try:
        return _load_reference(root, variant)
    finally:
        mixin_log.setLevel(level)


def _load_reference(root: Path, variant: str) -> torch.nn.Module:
    model = load_base(root)
    if variant == "base":
        return model
    if variant.startswith("route"):
        names = routed_names(int(variant.removeprefix("route")))
        peft_model = PeftModel.from_pretrained(model, str(root / "peft" / names[0]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(root / "peft" / name), adapter_name=name)
        return peft_model.eval()
    adapters.init(model)
    if variant in ("seq_bn", "lora"):
        model.load_adapter(str(root / "adapters" / variant))
        model.set_active_adapters(variant)
    elif variant in ("fuse", "parallel"):
        for name in FUSED:
            model.load_adapter(str(root / "adapters" / name))
        if variant == "fuse":
            model.load_adapter_fusion(str(root / "adapters" / "fusion"))
            model.set_active_adapters(Fuse(*FUSED))
        else:
            model.set_active_adapters(Parallel(*FUSED))
    else:
        raise ValueError(f"no reference model for variant {variant!r}")
    return model.eval()
