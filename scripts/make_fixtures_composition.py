"""Reference fixtures for composition blocks (Stack, Parallel, Fuse, Split, BatchSplit, Average, MultiTask)
from AdapterHub ``adapters`` 1.3.0, on the tiny base models saved by ``scripts/make_reference_fixtures.py``.

Same layout as the single-adapter cases (see ``docs/fixtures.md``) with several adapters per case:
``adapter_<name>/`` per adapter, ``fusion_<name>/`` per AdapterFusion (``save_adapter_fusion``), and in
case.json ``"adapters": {name: dir}``, ``"setup"`` (the spec's ``active`` JSON), ``"fusions"`` (spec
``fusions`` entries, ``{"load": dir}``) and ``"inputs"`` (extra forward inputs such as ``task_ids``, stored
in io.safetensors). Every adapter and fusion parameter is perturbed. Parallel outputs have N·B rows.

The mixed-method Parallel case (a bottleneck and a LoRA adapter) crashes in the reference; its expected
output is built from separate single-adapter runs (row block i = the model with only child i active), the
semantics fxadapt gives it (docs/composition.md).

Run (from the repository root, in the reference venv; only these cases are replaced)::

    /work/refvenv/bin/python scripts/make_fixtures_composition.py --out tests/fixtures/reference
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import adapters
import safetensors.torch
import torch
import transformers
from adapters.composition import Average, BatchSplit, Fuse, MultiTask, Parallel, Split, Stack

sys.path.insert(0, str(Path(__file__).parent))
from make_reference_fixtures import ARCHS, load_base, make_inputs, read_state, run, seed_for, weights_file  # noqa: E402

BN = "seq_bn"
BN8 = "seq_bn[reduction_factor=8]"
LORA_Q = "lora[r=4,alpha=8,attn_matrices=['q']]"
LORA_Q2 = "lora[r=2,alpha=4,attn_matrices=['q']]"
LORA_QV = "lora[r=4,alpha=8]"
LORA_QV2 = "lora[r=2,alpha=4]"  # the same projections as LORA_QV: Parallel/Average need both at each site

# case -> (arch, {adapter: config}, setup JSON, fusions [(children, config)], extra inputs)
CASES: dict[str, tuple[str, dict[str, str], Any, list, list[str]]] = {}
for _arch in ("bert", "llama"):
    CASES.update({
        f"{_arch}__stack_bn": (_arch, {"a": BN, "b": BN8}, {"stack": ["a", "b"]}, [], []),
        f"{_arch}__stack_lora": (_arch, {"a": LORA_Q, "b": LORA_Q2}, {"stack": ["a", "b"]}, [], []),
        f"{_arch}__parallel_bn": (_arch, {"a": BN, "b": BN8}, {"parallel": ["a", "b"]}, [], []),
        f"{_arch}__parallel_lora": (_arch, {"a": LORA_QV, "b": LORA_QV2}, {"parallel": ["a", "b"]}, [], []),
        f"{_arch}__average_bn": (_arch, {"a": BN, "b": BN8}, {"average": ["a", "b"], "weights": [0.3, 0.7]}, [],
                                 []),
        f"{_arch}__average_lora": (_arch, {"a": LORA_QV, "b": LORA_QV2},
                                   {"average": ["a", "b"], "weights": [0.3, 0.7]}, [], []),
        f"{_arch}__batch_split_bn": (_arch, {"a": BN, "b": BN8}, {"batch_split": ["a", "b"], "batch_sizes": [1, 1]},
                                     [], []),
        f"{_arch}__batch_split_lora": (_arch, {"a": LORA_QV, "b": LORA_QV2},
                                       {"batch_split": ["a", "b"], "batch_sizes": [1, 1]}, [], []),
        f"{_arch}__split_bn": (_arch, {"a": BN, "b": BN8}, {"split": ["a", "b"], "splits": [3, 4]}, [], []),
        f"{_arch}__fuse": (_arch, {"a": BN, "b": BN8}, {"fuse": ["a", "b"]}, [(["a", "b"], "dynamic")], []),
        f"{_arch}__multi_task_lora": (_arch, {"a": LORA_QV, "b": LORA_QV2}, {"multi_task": ["a", "b"]}, [],
                                      ["task_ids"]),
    })
CASES.update({
    "bert__stack_parallel": ("bert", {"a": BN, "b": BN8, "c": BN}, {"stack": ["a", {"parallel": ["b", "c"]}]}, [],
                             []),
    "bert__stack_fuse": ("bert", {"a": BN, "b": BN8, "c": BN}, {"stack": [{"fuse": ["a", "b"]}, "c"]},
                         [(["a", "b"], "static")], []),
    "bert__parallel_mixed": ("bert", {"a": BN, "b": LORA_QV}, {"parallel": ["a", "b"]}, [], []),
    "llama__parallel_mixed": ("llama", {"a": BN, "b": LORA_QV}, {"parallel": ["a", "b"]}, [], []),
})
# Bottleneck family (Compacter = PHM layers, invertible adapters), prefix tuning and ReFT in blocks.
PHM = "compacter++[reduction_factor=4]"
PHM_DOUBLE = "compacter[reduction_factor=4]"
INV = "seq_bn_inv"
PHM_INV = "compacter++[reduction_factor=4,inv_adapter='nice',inv_adapter_reduction_factor=4]"
PREFIX = "prefix_tuning[prefix_length=4,bottleneck_size=16]"
PREFIX2 = "prefix_tuning[prefix_length=4,flat=True]"
for _arch in ("bert", "llama"):
    CASES.update({
        # Stack: only the first adapter's invertible block runs (a's), b's is loaded but idle.
        f"{_arch}__stack_compacter_inv": (_arch, {"a": INV, "b": PHM_INV, "c": PHM_DOUBLE},
                                          {"stack": ["a", "b", "c"]}, [], []),
        f"{_arch}__parallel_compacter": (_arch, {"a": PHM_INV, "b": PHM}, {"parallel": ["a", "b"]}, [], []),
        f"{_arch}__fuse_compacter_inv": (_arch, {"a": INV, "b": PHM}, {"fuse": ["a", "b"]},
                                         [(["a", "b"], "dynamic")], []),
        f"{_arch}__blocks_compacter_inv": (_arch, {"a": PHM_INV, "b": INV}, {"stack": [
            {"split": ["a", "b"], "splits": [3, 4]}, {"batch_split": ["b", "a"], "batch_sizes": [1, 1]},
            {"average": ["a", "b"], "weights": [0.3, 0.7]}]}, [], []),
        f"{_arch}__stack_prefix": (_arch, {"p": PREFIX, "q": PREFIX2, "b": BN}, {"stack": ["p", "q", "b"]}, [], []),
        f"{_arch}__parallel_prefix": (_arch, {"p": PREFIX, "q": PREFIX2}, {"parallel": ["p", "q"]}, [], []),
        f"{_arch}__batch_split_prefix": (_arch, {"p": PREFIX, "q": PREFIX2},
                                         {"batch_split": ["p", "q"], "batch_sizes": [1, 1]}, [], []),
        f"{_arch}__stack_reft": (_arch, {"r": "noreft", "s": "loreft", "b": BN}, {"stack": ["r", "s", "b"]}, [], []),
    })
    # The reference crashes on these (a Compacter's attention-site adapter has no Compacter++ partner): the
    # expected rows come from separate single-adapter runs, fxadapt's Parallel semantics.
    CASES[f"{_arch}__compacter_parallel_mixed"] = (_arch, {"a": PHM_DOUBLE, "b": PHM}, {"parallel": ["a", "b"]}, [],
                                                   [])
CASES["bert__stack_two_parallels"] = ("bert", {"a": BN, "b": BN8, "c": PHM, "d": BN},
                                      {"stack": [{"parallel": ["a", "b"]}, {"parallel": ["c", "d"]}]}, [], [])
# LoRA family (IA3, VeRA, gated LoRA, DoRA) with plain LoRA, on square projections (in = out, so a Stack may
# chain an IA3 factor or one update into the next): BERT's q and v (its q alone barely moves the output),
# Llama's q (its GQA v is narrower).
def _family(arch: str) -> dict[str, str]:
    at = "attn_matrices=['q','v']" if arch == "bert" else "attn_matrices=['q']"
    return {"l": f"lora[r=4,alpha=8,{at}]", "i": f"ia3[{at},intermediate_lora=False]",
            "j": f"ia3[{at},intermediate_lora=False,alpha=2]", "v": f"vera[r=4,{at}]",
            "g": f"lora[r=2,alpha=4,{at},use_gating=True]", "d": f"dora[r=4,alpha=8,{at}]",
            "e": f"dora[r=2,alpha=4,{at}]"}


for _arch in ("bert", "llama"):
    _f = _family(_arch)
    CASES.update({
        f"{_arch}__stack_lora_family": (_arch, {k: _f[k] for k in "ilvgd"}, {"stack": ["i", "l", "v", "g", "d"]},
                                        [], []),
        f"{_arch}__stack_lora_family_scale": (_arch, {k: _f[k] for k in "dei"}, {"stack": ["d", "e", "i"]}, [], []),
        f"{_arch}__average_lora_family": (_arch, {k: _f[k] for k in "lvgd"},
                                          {"average": ["l", "v", "g", "d"], "weights": [0.1, 0.2, 0.3, 0.4]}, [], []),
        f"{_arch}__average_lora_family_ia3": (_arch, {k: _f[k] for k in "ij"},
                                              {"average": ["i", "j"], "weights": [0.3, 0.7]}, [], []),
        f"{_arch}__parallel_lora_family": (_arch, {k: _f[k] for k in "vgij"},
                                           {"parallel": [{"stack": ["v", "i"]}, {"stack": ["g", "j"]}]}, [], []),
        f"{_arch}__batch_split_lora_family": (_arch, {k: _f[k] for k in "vg"},
                                              {"batch_split": ["v", "g"], "batch_sizes": [1, 1]}, [], []),
        f"{_arch}__multi_task_lora_family": (_arch, {k: _f[k] for k in "vg"}, {"multi_task": ["v", "g"]}, [],
                                             ["task_ids"]),
    })
TASK_IDS = torch.tensor([1, 0])  # row 0 -> child 1, row 1 -> child 0
# With sdpa, adapters 1.3.0 masks a Llama prefix out (an inverted boolean mask: the prefix is a no-op), so
# these run the reference with eager attention, as the single prefix cases do (scripts/fixtures/prefix_reft.py).
EAGER = {case for case in CASES if case.startswith("llama__") and "prefix" in case}


def to_block(setup: Any) -> Any:
    """The spec's active JSON as a reference composition block."""
    if isinstance(setup, str):
        return setup
    kind = next(k for k in setup if k in ("stack", "parallel", "fuse", "split", "batch_split", "average",
                                          "multi_task"))
    children = [to_block(c) for c in setup[kind]]
    if kind == "split":
        return Split(*children, splits=setup["splits"])
    if kind == "batch_split":
        return BatchSplit(*children, batch_sizes=setup["batch_sizes"])
    if kind == "average":
        return Average(*children, weights=setup.get("weights"))
    return {"stack": Stack, "parallel": Parallel, "fuse": Fuse, "multi_task": MultiTask}[kind](*children)


def channels(setup: Any) -> int:
    """How many times a Parallel block (anywhere in the setup) replicates the batch."""
    if isinstance(setup, str):
        return 1
    if "parallel" in setup:
        return len(setup["parallel"])
    return max(channels(c) for v in setup.values() if isinstance(v, list) for c in v if not isinstance(c, int | float))


def perturb(model: torch.nn.Module, before: set[str], key: str) -> int:
    params = sorted((n, p) for n, p in model.named_parameters() if n not in before)
    gen = torch.Generator().manual_seed(seed_for(key))
    for _, p in params:
        p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2
    return len(params)


def load_model(arch: str, model_dir: Path, case: str) -> torch.nn.Module:
    if case not in EAGER:
        return load_base(arch, model_dir)
    model = ARCHS[arch][0].from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    model.config.name_or_path = f"models/{arch}"  # as load_base: independent of --out
    return model


def add_missing_shared(adapter_dir: Path, model: torch.nn.Module, name: str) -> None:
    """Write the Compacter shared tensors save_adapter drops for bare models (its save filter wants a leading
    dot, `.shared_parameters.NAME.`) into the weights file, as scripts/fixtures/single.py does."""
    file = weights_file(adapter_dir)
    state = read_state(file)
    missing = {n: p.detach().clone() for n, p in model.named_parameters()
               if n.startswith(f"shared_parameters.{name}.") and n not in state}
    if missing:
        torch.save({**state, **missing}, file)


def with_adapters(arch: str, model_dir: Path, configs: dict[str, str], case: str, fusions: list):
    model = load_model(arch, model_dir, case)
    adapters.init(model)
    for name, config in configs.items():
        before = {n for n, _ in model.named_parameters()}
        model.add_adapter(name, config=config)
        assert perturb(model, before, f"adapter/{case}/{name}")
    for children, config in fusions:
        before = {n for n, _ in model.named_parameters()}
        model.add_adapter_fusion(Fuse(*children), config=config)
        assert perturb(model, before, f"fusion/{case}/{','.join(children)}")
    return model.eval()


@torch.no_grad()
def make_case(case: str, model_dir: Path, case_dir: Path) -> dict[str, Any]:
    arch, configs, setup, fusions, extra = CASES[case]
    cls, _, fields = ARCHS[arch]
    base = load_model(arch, model_dir, case)
    inputs = make_inputs(arch, base.config)
    out_base = run(base, inputs, fields)
    model = with_adapters(arch, model_dir, configs, case, fusions)
    feed = dict(inputs, task_ids=TASK_IDS) if "task_ids" in extra else inputs
    if case.endswith("parallel_mixed"):
        parts = []
        for name in setup["parallel"]:
            model.set_active_adapters(name)
            parts.append(run(model, inputs, fields))
        out = {f: torch.cat([p[f] for p in parts]) for f in fields}
    else:
        model.set_active_adapters(to_block(setup))
        out = run(model, feed, fields)
    rows = channels(setup)
    for f in fields:
        ref = out_base[f].repeat(rows, *[1] * (out_base[f].dim() - 1))
        assert out[f].shape == ref.shape, (case, out[f].shape)
        assert (out[f] - ref).abs().max().item() > 1e-3, f"{case}: composition output equals the base output"
    for name in configs:
        model.save_adapter(str(case_dir / f"adapter_{name}"), name)
        add_missing_shared(case_dir / f"adapter_{name}", model, name)
    fusion_dirs = []
    for children, _ in fusions:
        directory = f"fusion_{'_'.join(children)}"
        model.save_adapter_fusion(str(case_dir / directory), ",".join(children))
        fusion_dirs.append({"load": directory})
    tensors = dict(inputs)
    if "task_ids" in extra:
        tensors["task_ids"] = TASK_IDS
    tensors.update({f"out.{f}": t for f, t in out.items()})
    tensors.update({f"out_base.{f}": t for f, t in out_base.items()})
    safetensors.torch.save_file(tensors, case_dir / "io.safetensors")
    return {
        "arch": arch,
        "model_class": cls.__name__,
        "method": case.split("__")[1],
        "config": configs,
        "adapters": {name: f"adapter_{name}" for name in configs},
        "setup": setup,
        "fusions": fusion_dirs,
        "inputs": extra,
        "outputs": fields,
        "attn_implementation": model.config._attn_implementation,
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/reference"))
    parser.add_argument("cases", nargs="*", help="only these cases (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("adapters.model_mixin").setLevel(logging.ERROR)
    torch.use_deterministic_algorithms(True)
    for case in args.cases or CASES:
        case_dir = args.out / "cases" / case
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        try:
            meta = make_case(case, args.out / "models" / CASES[case][0], case_dir)
        except Exception:
            shutil.rmtree(case_dir)
            raise
        (case_dir / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{case}: ok")


if __name__ == "__main__":
    main()
