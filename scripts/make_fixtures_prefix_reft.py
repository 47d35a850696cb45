"""Reference fixtures for prefix tuning, prompt tuning and ReFT from AdapterHub ``adapters`` 1.3.0.

Same layout and base models as ``scripts/make_reference_fixtures.py`` (whose helpers this imports; see
``docs/fixtures.md``), with three differences that the reference forces:

- GPT-2, Llama and DistilBERT prefix cases run the reference with ``attn_implementation="eager"``:
  with sdpa, adapters 1.3.0 masks the prefix out (GPT-2/Llama: inverted boolean mask, so the adapter
  is a no-op) or adds +1 to its attention logits (DistilBERT: a "1" written into an additive mask).
  DistilBERT prompt tuning only runs with sdpa and has the same +1; its case runs the reference with
  that one value corrected to 0 (``"reference_patched"`` in case.json). See
  ``docs/reference-deviations.md``.
- LoReFT's orthogonal projection truncates the diagonal of its ``original`` parameter to int, so
  the diagonal is perturbed to ``±(1 + u/2)`` (truncating to ±1), never into (-1, 1) where the
  projection would vanish. The ``base`` buffer comes from a seeded ``add_adapter``.
- adapters never saves DiReFT's ``subtract_projection=False`` (and ignores it on reload, so a
  reloaded DiReFT computes NoReFT there); the saved config gets the field added (``"config_patched"``
  in case.json) and the expected outputs are those of the DiReFT the reference trained in memory.

Run from the repository root with the reference environment (CPU, deterministic, a few seconds)::

    /work/refvenv/bin/python scripts/make_fixtures_prefix_reft.py --out tests/fixtures/reference

Only this script's cases (``CASES``) are replaced; the base models are read from ``--models``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import adapters
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from make_reference_fixtures import (  # noqa: E402
    ADAPTER_NAME,
    ARCHS,
    _one_line,
    make_inputs,
    read_state,
    run,
    seed_for,
    weights_file,
)

_PREFIX = "prefix_tuning[prefix_length=5,bottleneck_size=16]"
# case -> (arch, adapters config string, options: attn implementation, perturbation scale)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert__prefix_tuning": ("bert", _PREFIX, {}),
    "bert__prefix_tuning_flat": ("bert", "prefix_tuning_flat[prefix_length=4]", {"scale": 1.0}),
    "bert__prefix_tuning_leave_out": ("bert", "prefix_tuning[prefix_length=3,bottleneck_size=8,leave_out=[0]]", {}),
    "bert_seqcls__prefix_tuning": ("bert_seqcls", _PREFIX, {"scale": 1.0}),
    "distilbert__prefix_tuning": ("distilbert", _PREFIX, {"attn": "eager"}),
    "gpt2__prefix_tuning": ("gpt2", _PREFIX, {"attn": "eager"}),
    "llama__prefix_tuning": ("llama", _PREFIX, {"attn": "eager"}),
    "bert__prompt_tuning": ("bert", "prompt_tuning", {}),
    "bert__prompt_tuning_after_bos": ("bert", "prompt_tuning[prompt_length=4,combine='prefix_after_bos']", {}),
    "bert_seqcls__prompt_tuning": ("bert_seqcls", "prompt_tuning[prompt_length=4]", {"scale": 1.0}),
    "distilbert__prompt_tuning": ("distilbert", "prompt_tuning[prompt_length=4]", {"fix_mask": True}),
    "roberta__prompt_tuning": ("roberta", "prompt_tuning[prompt_length=4]", {}),
    "bert__loreft": ("bert", "loreft", {}),
    "bert__noreft": ("bert", "noreft", {}),
    "bert__direft": ("bert", "direft", {}),
    "bert__loreft_tied_suffix": ("bert", "loreft[prefix_positions=2,suffix_positions=2,r=2,tied_weights=True]", {}),
    "bert__noreft_suffix": ("bert", "noreft[prefix_positions=1,suffix_positions=3,r=2,non_linearity='tanh',"
                                    "layers=[1]]", {}),
    "bert_seqcls__loreft": ("bert_seqcls", "loreft[r=2]", {"scale": 0.5}),
    "gpt2__loreft": ("gpt2", "loreft[suffix_positions=1]", {}),
    "llama__direft": ("llama", "direft[suffix_positions=2]", {}),
}


def load(arch: str, model_dir: Path, attn: str | None) -> transformers.PreTrainedModel:
    """The saved base model in eval mode, fp32, with the given attention implementation."""
    kwargs = {"attn_implementation": attn} if attn else {}
    model = ARCHS[arch][0].from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    model.config.name_or_path = f"models/{arch}"  # saved as "model_name"; keep independent of --out
    return model


def perturb(model: transformers.PreTrainedModel, before: set[str], case: str, scale: float) -> int:
    """Overwrite every new parameter with seeded noise (LoReFT's diagonal keeps |d| >= 1, see above)."""
    gen = torch.Generator().manual_seed(seed_for("adapter/" + case))
    new = sorted((n, p) for n, p in model.named_parameters() if n not in before)
    for name, p in new:
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
        if name.endswith("parametrizations.weight.original"):
            size = min(p.shape)
            sign = torch.where(torch.rand(size, generator=gen) < 0.5, -1.0, 1.0)
            noise[range(size), range(size)] = sign * (1.0 + 0.5 * torch.rand(size, generator=gen))
        p.data = noise
    return len(new)


def _fix_distilbert_prompt_mask() -> None:
    """adapters 1.3.0 prepends 1 to DistilBERT's additive sdpa mask for the prompt: write 0 (attend) instead."""
    import adapters.models.distilbert.modeling_distilbert as distilbert
    from adapters.utils import prefix_attention_mask

    def fixed(mask, dim=3, prefix_value=0):
        return prefix_attention_mask(mask, dim, 0 if mask is not None and mask.is_floating_point() else prefix_value)

    distilbert.prefix_attention_mask = fixed


def make_case(case: str, models_root: Path, case_dir: Path) -> dict[str, Any]:
    arch, config_str, options = CASES[case]
    attn, scale = options.get("attn"), options.get("scale", 0.2)
    _, _, fields = ARCHS[arch]
    model_dir = models_root / arch

    base = load(arch, model_dir, attn)
    inputs = make_inputs(arch, base.config)
    out_base = run(base, inputs, fields)

    if options.get("fix_mask"):
        _fix_distilbert_prompt_mask()
    model = load(arch, model_dir, attn)
    adapters.init(model)
    before = {n for n, _ in model.named_parameters()}
    torch.manual_seed(seed_for("init/" + case))  # LoReFT's `base` buffer is drawn at add_adapter
    model.add_adapter(ADAPTER_NAME, config=config_str)
    n_new = perturb(model, before, case, scale)
    assert n_new, f"{case}: add_adapter created no parameters"
    model.eval()
    model.set_active_adapters(ADAPTER_NAME)
    out = run(model, inputs, fields)
    for f in fields:
        grown = out[f].shape != out_base[f].shape  # prompt tuning adds positions: compare the input's positions
        new = out[f][:, out[f].shape[1] - out_base[f].shape[1]:] if grown else out[f]
        diff = (new - out_base[f]).abs().max().item()
        assert diff > 1e-3, f"{case}: adapter output equals base output for {f} (max diff {diff})"

    adapter_dir = case_dir / "adapter"
    model.save_adapter(str(adapter_dir), ADAPTER_NAME)
    patched = case.endswith("direft")
    if patched:  # adapters 1.3.0 drops DiReFT's subtract_projection=False when saving (a class attribute)
        config_file = adapter_dir / "adapter_config.json"
        saved = json.loads(config_file.read_text())
        saved["config"]["subtract_projection"] = False
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True))
    state = read_state(weights_file(adapter_dir))

    fresh = load(arch, model_dir, attn)
    adapters.init(fresh)
    assert fresh.load_adapter(str(adapter_dir)) == ADAPTER_NAME
    fresh.set_active_adapters(ADAPTER_NAME)
    fresh.eval()
    out_reload = run(fresh, inputs, fields)
    for f in fields:
        # adapters 1.3.0 reloads any ReFT config with subtract_projection=True, even when the file says
        # false: a reloaded DiReFT computes NoReFT there. The fixture keeps DiReFT's (in-memory) numbers.
        assert torch.equal(out_reload[f], out[f]) != patched, f"{case}: reloaded adapter gives different {f}"

    tensors = dict(inputs)
    tensors.update({f"out.{f}": t for f, t in out.items()})
    tensors.update({f"out_base.{f}": t for f, t in out_base.items()})
    import safetensors.torch

    safetensors.torch.save_file(tensors, case_dir / "io.safetensors")
    meta: dict[str, Any] = {
        "arch": arch,
        "model_class": ARCHS[arch][0].__name__,
        "adapter_name": ADAPTER_NAME,
        "method": case.split("__", 1)[1],
        "config": config_str,
        "outputs": fields,
        "weights_file": weights_file(adapter_dir).name,
        "attn_implementation": fresh.config._attn_implementation,
        "adapter_keys": [
            {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in sorted(state.items())
        ],
        "head_keys": [],
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }
    if patched:
        meta["config_patched"] = {"subtract_projection": False}
    if options.get("fix_mask"):
        meta["reference_patched"] = "DistilBERT's prompt mask prefix value 1 -> 0 (additive mask: 0 = attend)"
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/reference"))
    parser.add_argument("--models", type=Path, default=Path("tests/fixtures/reference/models"),
                        help="the saved base models (written by make_reference_fixtures.py)")
    parser.add_argument("cases", nargs="*", help="case names (default: all of CASES)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("adapters.model_mixin").setLevel(logging.ERROR)
    torch.use_deterministic_algorithms(True)
    for case in args.cases or CASES:
        case_dir = args.out / "cases" / case
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        meta = make_case(case, args.models, case_dir)
        text = re.sub(r"\{[^{}\[\]]*\[[^\]]*\][^{}]*\}", _one_line, json.dumps(meta, indent=2))
        (case_dir / "case.json").write_text(text + "\n")
        print(f"{case}: {len(meta['adapter_keys'])} adapter tensors, attn={meta['attn_implementation']}")


if __name__ == "__main__":
    main()
