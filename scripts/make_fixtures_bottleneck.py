"""Reference fixtures for the bottleneck family beyond seq_bn/double_seq_bn, from AdapterHub ``adapters`` 1.3.0.

Cases: par_bn / scaled_par_bn, gated and AdapterPlus (channel-scaled) adapters, Compacter / Compacter++
(PHM layers with shared parameters) and invertible adapters, on the tiny base models that
``scripts/make_reference_fixtures.py`` saved under ``tests/fixtures/reference/models`` (reused, not rebuilt).
Same layout and checks as that script (see ``docs/fixtures.md``), with two twists (also in ``docs/methods.md``):

- adapters 1.3.0 does not save a Compacter's shared parameters from a *bare* base model (its save
  filter looks for ``.shared_parameters.NAME.`` with a leading dot, which ``shared_parameters.NAME.phm_rule``
  lacks), so such a checkpoint cannot reproduce its adapter. For the bare-model Compacter cases this
  script adds the missing tensors to the saved weights under the reference's own parameter names.
- AdapterPlus defaults to ``stochastic_depth=0.1``, which makes the reference import torchvision's
  ``StochasticDepth``. torchvision is not installed in the reference venv; a stand-in with its exact
  semantics (identity in eval mode; row-wise drop and rescale in training) is provided while those
  cases are built. All outputs are taken in eval mode.

Run (from the repository root, in the reference venv; only these cases are replaced)::

    /work/refvenv/bin/python scripts/make_fixtures_bottleneck.py --out tests/fixtures/reference
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import adapters
import adapters.methods.modeling as ref_modeling
import safetensors.torch
import torch
import transformers
from adapters import AdapterPlusConfig

sys.path.insert(0, str(Path(__file__).parent))
from make_reference_fixtures import (  # noqa: E402  (script-local import)
    ADAPTER_NAME,
    ARCHS,
    _one_line,
    load_base,
    make_inputs,
    read_state,
    run,
    seed_for,
    weights_file,
)

# case name -> (arch, adapters config: a config string or a config object, human-readable config)
ADAPTERPLUS = AdapterPlusConfig(reduction_factor=8)  # the default 96 leaves no bottleneck at hidden size 32
CASES: dict[str, tuple[str, Any, str]] = {
    "bert__par_bn": ("bert", "par_bn", "par_bn"),
    "gpt2__par_bn": ("gpt2", "par_bn", "par_bn"),
    "llama__par_bn": ("llama", "par_bn", "par_bn"),
    "bert_seqcls__par_bn": ("bert_seqcls", "par_bn", "par_bn"),
    "bert__scaled_par_bn": ("bert", "scaled_par_bn", "scaled_par_bn"),
    "bert__seq_bn_gating": ("bert", "seq_bn[use_gating=True]", "seq_bn[use_gating=True]"),
    "bert__adapterplus": ("bert", ADAPTERPLUS, "AdapterPlusConfig(reduction_factor=8)"),
    "llama__adapterplus": ("llama", ADAPTERPLUS, "AdapterPlusConfig(reduction_factor=8)"),
    # phm_dim 4 must divide the bottleneck: reduction_factor 4 gives 8 at hidden size 32
    "bert__compacter": ("bert", "compacter[reduction_factor=4]", "compacter[reduction_factor=4]"),
    "gpt2__compacterpp": ("gpt2", "compacter++[reduction_factor=4]", "compacter++[reduction_factor=4]"),
    "bert_seqcls__compacter": ("bert_seqcls", "compacter[reduction_factor=4]", "compacter[reduction_factor=4]"),
    "bert_seqcls__compacter_shared_w": (
        "bert_seqcls", "compacter[reduction_factor=4,shared_W_phm=True,factorized_phm_rule=True,phm_rank=2]",
        "compacter[reduction_factor=4,shared_W_phm=True,factorized_phm_rule=True,phm_rank=2]"),
    "bert__seq_bn_inv": ("bert", "seq_bn_inv", "seq_bn_inv"),
    "gpt2__seq_bn_inv": ("gpt2", "seq_bn_inv", "seq_bn_inv"),
    "llama__double_seq_bn_inv": ("llama", "double_seq_bn_inv", "double_seq_bn_inv"),
}


class _StochasticDepth(torch.nn.Module):
    """torchvision.ops.StochasticDepth (mode "row"): identity unless training."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype).bernoulli_(1.0 - self.p)
        return x * keep.div_(1.0 - self.p)


@contextlib.contextmanager
def stochastic_depth_stand_in() -> Iterator[None]:
    names = ("torchvision", "torchvision.ops", "torchvision.ops.stochastic_depth")
    saved = {n: sys.modules.get(n) for n in names}
    module = types.ModuleType(names[-1])
    module.StochasticDepth = _StochasticDepth
    sys.modules.update({names[0]: types.ModuleType(names[0]), names[1]: types.ModuleType(names[1]),
                        names[2]: module})
    available = ref_modeling.is_torchvision_available
    ref_modeling.is_torchvision_available = lambda: True
    try:
        yield
    finally:
        ref_modeling.is_torchvision_available = available
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def shared_state(model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    """The adapter's shared parameters under their model parameter names (`[bert.]shared_parameters.a.*`)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if f"shared_parameters.{ADAPTER_NAME}." in n}


def add_missing_shared(adapter_dir: Path, model: transformers.PreTrainedModel) -> list[str]:
    """Write the shared tensors save_adapter dropped (bare models) into the weights file; returns their keys."""
    file = weights_file(adapter_dir)
    state = read_state(file)
    missing = {k: v for k, v in shared_state(model).items() if k not in state}
    if missing:
        state.update(missing)
        torch.save(state, file)
    return sorted(missing)


def make_case(name: str, model_dir: Path, case_dir: Path) -> dict[str, Any]:
    arch, config, config_text = CASES[name]
    cls, _, fields = ARCHS[arch]
    base = load_base(arch, model_dir)
    inputs = make_inputs(arch, base.config)
    out_base = run(base, inputs, fields)

    model = load_base(arch, model_dir)
    adapters.init(model)
    before = {n for n, _ in model.named_parameters()}
    model.add_adapter(ADAPTER_NAME, config=config)
    new_params = sorted((n, p) for n, p in model.named_parameters() if n not in before)
    assert new_params, f"{name}: add_adapter created no parameters"
    gen = torch.Generator().manual_seed(seed_for("adapter/" + name))
    for _, p in new_params:  # perturb everything (up projections and LoRA-like factors start at zero)
        p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2
    model.eval()

    model.set_active_adapters(None)
    out_off = run(model, inputs, fields)
    model.set_active_adapters(ADAPTER_NAME)
    out = run(model, inputs, fields)
    for f in fields:
        assert torch.allclose(out_off[f], out_base[f], atol=1e-6), f"{name}: inactive adapter changes {f}"
        diff = (out[f] - out_base[f]).abs().max().item()
        assert diff > 1e-3, f"{name}: adapter output equals base output for {f} (max diff {diff})"

    adapter_dir = case_dir / "adapter"
    model.save_adapter(str(adapter_dir), ADAPTER_NAME)
    added = add_missing_shared(adapter_dir, model)
    state = read_state(weights_file(adapter_dir))
    assert len(state) == len(new_params), f"{name}: saved {len(state)} tensors, created {len(new_params)}"

    # Reload check: a fresh base model + load_adapter (+ the shared tensors adapters cannot load back
    # for bare models) must reproduce the outputs bit-exactly.
    fresh = load_base(arch, model_dir)
    adapters.init(fresh)
    assert fresh.load_adapter(str(adapter_dir)) == ADAPTER_NAME
    if added:
        params = dict(fresh.named_parameters())
        with torch.no_grad():
            for key in added:
                params[key].copy_(state[key])
    fresh.set_active_adapters(ADAPTER_NAME)
    fresh.eval()
    out_reload = run(fresh, inputs, fields)
    for f in fields:
        assert torch.equal(out_reload[f], out[f]), f"{name}: reloaded adapter gives different {f}"

    tensors = dict(inputs)
    tensors.update({f"out.{f}": t for f, t in out.items()})
    tensors.update({f"out_base.{f}": t for f, t in out_base.items()})
    safetensors.torch.save_file(tensors, case_dir / "io.safetensors")
    head_file = adapter_dir / "pytorch_model_head.bin"
    head = read_state(head_file) if head_file.is_file() else {}
    return {
        "arch": arch,
        "model_class": cls.__name__,
        "adapter_name": ADAPTER_NAME,
        "method": name.split("__", 1)[1],
        "config": config_text,
        "outputs": fields,
        "weights_file": weights_file(adapter_dir).name,
        "attn_implementation": model.config._attn_implementation,
        "adapter_keys": [
            {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in sorted(state.items())
        ],
        "added_keys": added,
        "head_keys": [{"key": k, "shape": list(v.shape)} for k, v in sorted(head.items())],
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/reference"))
    parser.add_argument("cases", nargs="*", help="case names to rebuild (default: all of this script's cases)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # bit-reproducible reductions
    logging.getLogger("adapters.model_mixin").setLevel(logging.ERROR)
    torch.use_deterministic_algorithms(True)
    for name in args.cases or CASES:
        arch = CASES[name][0]
        case_dir = args.out / "cases" / name
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        plus = isinstance(CASES[name][1], AdapterPlusConfig)
        with stochastic_depth_stand_in() if plus else contextlib.nullcontext():
            meta = make_case(name, args.out / "models" / arch, case_dir)
        text = re.sub(r"\{[^{}\[\]]*\[[^\]]*\][^{}]*\}", _one_line, json.dumps(meta, indent=2))
        (case_dir / "case.json").write_text(text + "\n")
        extra = f", added {meta['added_keys']}" if meta["added_keys"] else ""
        print(f"{name}: {len(meta['adapter_keys'])} adapter tensors{extra}")


if __name__ == "__main__":
    main()
