"""Generate reference fixtures from AdapterHub ``adapters`` 1.3.0 for fxadapt's parity tests.

The fixtures pin the *numerics* and the *checkpoint key naming* of the reference library so that
fxadapt's tests can run without ``adapters`` installed.  See ``docs/fixtures.md`` for the layout.

Reference environment (CPU only, kept outside the fxadapt environment)::

    python -m venv .refvenv
    .refvenv/bin/pip install torch==2.13.0 transformers==4.57.6 adapters==1.3.0 peft safetensors

Run (from the repository root; deterministic, takes well under a minute on CPU)::

    .refvenv/bin/python scripts/make_reference_fixtures.py --out tests/fixtures/reference

No Hugging Face Hub access is needed: tiny random base models are built from configs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import adapters
import safetensors.torch
import torch
import transformers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaModel,
)

ADAPTER_NAME = "a"
# A quarter of the parity tolerance (1e-5): the most the reference's own fp32 rounding may move an output.
FP32_ERROR_LIMIT = 2.5e-6
BATCH, SEQ, N_PAD = 2, 7, 2

_BERTLIKE = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)

# arch -> (model class, config, output fields)
ARCHS: dict[str, tuple[type[PreTrainedModel], PretrainedConfig, list[str]]] = {
    "bert": (BertModel, BertConfig(**_BERTLIKE), ["last_hidden_state"]),
    "roberta": (RobertaModel, RobertaConfig(**_BERTLIKE), ["last_hidden_state"]),
    "distilbert": (
        DistilBertModel,
        DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
        ),
        ["last_hidden_state"],
    ),
    "gpt2": (
        GPT2Model,
        GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64),
        ["last_hidden_state"],
    ),
    "llama": (
        LlamaModel,
        LlamaConfig(**_BERTLIKE, num_key_value_heads=2),
        ["last_hidden_state"],
    ),
    "bert_seqcls": (BertForSequenceClassification, BertConfig(**_BERTLIKE, num_labels=3), ["logits"]),
}

METHODS: dict[str, str] = {
    "seq_bn": "seq_bn",
    "double_seq_bn": "double_seq_bn",
    "lora_qv": "lora[r=4,alpha=8]",
    "lora_all": "lora[r=4,alpha=16,attn_matrices=['q','k','v'],intermediate_lora=True,output_lora=True]",
}


def seed_for(name: str) -> int:
    """Stable (process-independent) seed derived from a string."""
    return zlib.crc32(name.encode())


def build_base_model(arch: str, out_dir: Path) -> None:
    """Create a tiny random base model and save it with safetensors."""
    cls, config, _ = ARCHS[arch]
    config.architectures = [cls.__name__]
    torch.manual_seed(seed_for(arch))
    model = cls(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)


def load_base(arch: str, model_dir: Path) -> PreTrainedModel:
    """Load the saved base model (default attention implementation) in eval mode, fp32."""
    model = ARCHS[arch][0].from_pretrained(model_dir, dtype=torch.float32).eval()
    model.config.name_or_path = f"models/{arch}"  # saved as "model_name"; keep independent of --out
    return model


def make_inputs(arch: str, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Batch 2 x seq 7; row 1 right-padded (last 2 positions masked, filled with the pad id)."""
    gen = torch.Generator().manual_seed(seed_for("inputs/" + arch))
    input_ids = torch.randint(3, config.vocab_size, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    attention_mask[1, SEQ - N_PAD :] = 0
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    input_ids[1, SEQ - N_PAD :] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def run(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], fields: list[str]
) -> dict[str, torch.Tensor]:
    """Forward pass returning the requested output fields (contiguous fp32 copies)."""
    out = model(**inputs)
    return {f: getattr(out, f).detach().float().contiguous().clone() for f in fields}


def weights_file(adapter_dir: Path) -> Path:
    """The weights file written by ``save_adapter`` (``pytorch_adapter.bin`` by default)."""
    for name in ("adapter.safetensors", "pytorch_adapter.bin"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise FileNotFoundError(f"no adapter weights in {adapter_dir}")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved by adapters (torch pickle or safetensors)."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def make_case(arch: str, method: str, model_dir: Path, case_dir: Path) -> dict[str, Any]:
    """Build, save, reload-check and dump one ``<arch>__<method>`` case; returns case.json content."""
    cls, _, fields = ARCHS[arch]
    config_str = METHODS[method]
    case = f"{arch}__{method}"

    base = load_base(arch, model_dir)
    inputs = make_inputs(arch, base.config)
    out_base = run(base, inputs, fields)

    model = load_base(arch, model_dir)
    adapters.init(model)
    before = {n for n, _ in model.named_parameters()}
    model.add_adapter(ADAPTER_NAME, config=config_str)
    new_params = sorted((n, p) for n, p in model.named_parameters() if n not in before)
    assert new_params, f"{case}: add_adapter created no parameters"
    model.eval()
    model.set_active_adapters(ADAPTER_NAME)  # the conditioning is measured on the adapted output
    std, fp32_err = perturb_conditioned(model, new_params, seed_for("adapter/" + case), inputs, fields)

    model.set_active_adapters(None)
    out_off = run(model, inputs, fields)
    model.set_active_adapters(ADAPTER_NAME)
    out = run(model, inputs, fields)
    attn_impl = model.config._attn_implementation
    for f in fields:
        assert torch.allclose(out_off[f], out_base[f], atol=1e-6), f"{case}: inactive adapter changes {f}"
        diff = (out[f] - out_base[f]).abs().max().item()
        assert diff > 1e-3, f"{case}: adapter output equals base output for {f} (max diff {diff})"

    adapter_dir = case_dir / "adapter"
    model.save_adapter(str(adapter_dir), ADAPTER_NAME)
    state = read_state(weights_file(adapter_dir))
    # Prefix tuning also saves its pool's derived tensors, so a union with it saves more than it created.
    assert len(state) >= len(new_params), f"{case}: saved {len(state)} tensors, created {len(new_params)}"

    # Reload check: a fresh base model + load_adapter must reproduce the outputs bit-exactly.
    fresh = load_base(arch, model_dir)
    adapters.init(fresh)
    name = fresh.load_adapter(str(adapter_dir))
    assert name == ADAPTER_NAME, name
    fresh.set_active_adapters(name)
    fresh.eval()
    out_reload = run(fresh, inputs, fields)
    for f in fields:
        assert torch.equal(out_reload[f], out[f]), f"{case}: reloaded adapter gives different {f}"

    tensors = dict(inputs)
    tensors.update({f"out.{f}": t for f, t in out.items()})
    tensors.update({f"out_base.{f}": t for f, t in out_base.items()})
    safetensors.torch.save_file(tensors, case_dir / "io.safetensors")

    head_file = adapter_dir / "pytorch_model_head.bin"  # static-head models also save their head
    head = read_state(head_file) if head_file.is_file() else {}
    return {
        "arch": arch,
        "model_class": cls.__name__,
        "adapter_name": ADAPTER_NAME,
        "method": method,
        "config": config_str,
        "outputs": fields,
        "weights_file": weights_file(adapter_dir).name,
        "attn_implementation": attn_impl,
        "perturbation_std": std,
        "fp32_error": float(f"{fp32_err:.3g}"),
        "adapter_keys": [
            {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in sorted(state.items())
        ],
        "head_keys": [{"key": k, "shape": list(v.shape)} for k, v in sorted(head.items())],
        "versions": {
            "adapters": adapters.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


def fp32_error(model: PreTrainedModel, inputs: dict[str, torch.Tensor], fields: list[str]) -> float:
    """Max |fp32 output - fp64 output|: the reference's own rounding error on this case."""
    exact = copy.deepcopy(model).double()
    out32, out64 = run(model, inputs, fields), {f: getattr(exact(**inputs), f) for f in fields}
    return max((out32[f].double() - out64[f]).abs().max().item() for f in fields)


@torch.no_grad()
def perturb_conditioned(model: PreTrainedModel, params: list[tuple[str, torch.nn.Parameter]], seed: int,
                        inputs: dict[str, torch.Tensor], fields: list[str]) -> tuple[float, float]:
    """Set every adapter parameter to N(0, std²) draws (LoRA B is zero-initialised, so nothing stays at its
    identity init); returns (std, the reference's fp32 error).

    std starts at 0.2 and halves (same draws, scaled) while the reference's own fp32 rounding error exceeds
    FP32_ERROR_LIMIT: where float32 rounding alone moves the output by half the parity tolerance, two
    correct implementations that merely sum in a different order can differ by more than the tolerance,
    so such a case cannot tell right from wrong (docs/fixtures.md, "Conditioning").
    """
    draws = _draws(params, seed)
    std = 0.2
    while True:
        for (_, p), draw in zip(params, draws, strict=True):
            p.data = draw * std
        err = fp32_error(model, inputs, fields)
        if err <= FP32_ERROR_LIMIT:
            return std, err
        std /= 2


def _draws(params: list[tuple[str, torch.nn.Parameter]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for _, p in params]


def _one_line(match: re.Match[str]) -> str:
    """Collapse a pretty-printed ``{"key": ..., "shape": [...]}`` object onto one line."""
    return json.dumps(json.loads(match.group(0)))


def main() -> None:
    """Regenerate every model and case under ``--out`` (existing ``models/`` and ``cases/`` are replaced)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/reference"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # bit-reproducible reductions
    # Expected when computing the adapters-inactive output; silence the per-forward warning.
    logging.getLogger("adapters.model_mixin").setLevel(logging.ERROR)
    torch.use_deterministic_algorithms(True)

    models_root, cases_root = args.out / "models", args.out / "cases"
    for root in (models_root, cases_root):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)

    for arch in ARCHS:
        model_dir = models_root / arch
        build_base_model(arch, model_dir)
        for method in METHODS:
            case_dir = cases_root / f"{arch}__{method}"
            case_dir.mkdir()
            meta = make_case(arch, method, model_dir, case_dir)
            text = re.sub(r"\{[^{}\[\]]*\[[^\]]*\][^{}]*\}", _one_line, json.dumps(meta, indent=2))
            (case_dir / "case.json").write_text(text + "\n")
            n_keys, attn = len(meta["adapter_keys"]), meta["attn_implementation"]
            print(f"{case_dir.name}: {n_keys} adapter tensors, attn={attn}")


if __name__ == "__main__":
    main()
