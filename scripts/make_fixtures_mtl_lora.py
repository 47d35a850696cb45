"""Reference fixtures for MTL-LoRA (``MTLLoRAConfig``, architecture "mtl_lora") from AdapterHub ``adapters``
1.3.0, on the tiny BERT saved by ``scripts/make_reference_fixtures.py`` (see ``docs/fixtures.md``).

- ``bert__mtl_lora``: the reference's multi-task use. Three tasks a, b, c, each an MTL-LoRA adapter with
  the same config (n_up_projection 3, q/v and the FFN's first projection), their A and B tied with
  ``model.share_parameters(MultiTask("a", "b", "c"))`` (task-specific matrix and weights stay per task),
  active as ``MultiTask("a", "b", "c")`` with a ``task_ids`` input. The batch has 3 rows (task ids
  [2, 0, 1], not sorted), rows 1 and 2 right-padded. Composition layout (``adapter_<task>/`` each,
  ``"adapters"``, ``"setup"``, ``"inputs": ["task_ids"]`` in case.json): each task's saved checkpoint holds
  its copy of the shared A and B. The generator checks that loading the three checkpoints into a fresh
  model, without share_parameters, reproduces the output bit-exactly.
- ``bert__mtl_lora_gating``: one MTL-LoRA adapter active alone (single-adapter layout, ``adapter/``), gated,
  n_up_projection 2, weights_sharpness 0.5, on q/v and the FFN's last projection.

Every adapter parameter (the shared A/B once) is set to randn · std, std 0.2 halved while the reference's
own fp32 rounding error exceeds 2.5e-6 (``fp32_error``, ``perturbation_std`` in case.json).

Run (from the repository root, in the reference venv; only these cases are replaced)::

    /work/refvenv/bin/python scripts/make_fixtures_mtl_lora.py --out tests/fixtures/reference
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
import safetensors.torch
import torch
import transformers
from adapters.composition import MultiTask

sys.path.insert(0, str(Path(__file__).parent))
from make_reference_fixtures import (  # noqa: E402
    ARCHS,
    _one_line,
    load_base,
    make_inputs,
    perturb_conditioned,
    read_state,
    run,
    seed_for,
    weights_file,
)

MTL_TASKS = "mtl_lora[r=4,alpha=8,n_up_projection=3,intermediate_lora=True]"
MTL_GATED = "mtl_lora[r=4,alpha=8,n_up_projection=2,use_gating=True,output_lora=True,weights_sharpness=0.5]"
TASKS = ["a", "b", "c"]
TASK_IDS = torch.tensor([2, 0, 1])
CASES = ("bert__mtl_lora", "bert__mtl_lora_gating")


def three_rows(arch: str, config) -> dict[str, torch.Tensor]:
    """The usual 2-row inputs plus a third row, its last 3 positions padded (one row per task)."""
    inputs = make_inputs(arch, config)
    gen = torch.Generator().manual_seed(seed_for("inputs3/" + arch))
    seq = inputs["input_ids"].shape[1]
    ids = torch.randint(3, config.vocab_size, (1, seq), generator=gen, dtype=torch.int64)
    mask = torch.ones(1, seq, dtype=torch.int64)
    mask[0, seq - 3:] = 0
    ids[0, seq - 3:] = config.pad_token_id if config.pad_token_id is not None else 0
    return {"input_ids": torch.cat([inputs["input_ids"], ids]), "attention_mask": torch.cat([inputs["attention_mask"],
                                                                                               mask])}


def keys(state: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    return [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in sorted(state.items())]


def versions() -> dict[str, str]:
    return {"adapters": adapters.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


@torch.no_grad()
def make_multi_task(case: str, model_dir: Path, case_dir: Path) -> dict[str, Any]:
    arch = case.split("__")[0]
    cls, _, fields = ARCHS[arch]
    base = load_base(arch, model_dir)
    inputs = three_rows(arch, base.config)
    out_base = run(base, inputs, fields)
    feed = dict(inputs, task_ids=TASK_IDS)

    model = load_base(arch, model_dir)
    adapters.init(model)
    before = {n for n, _ in model.named_parameters()}
    for task in TASKS:
        model.add_adapter(task, config=MTL_TASKS)
    model.share_parameters(adapter_names=MultiTask(*TASKS))
    # named_parameters lists each shared A/B once (under shared_parameters.a,b,c), so it is drawn once.
    params = sorted((n, p) for n, p in model.named_parameters() if n not in before)
    assert any(".shared_parameters." in n for n, _ in params), "share_parameters tied nothing"
    model.eval()
    model.set_active_adapters(MultiTask(*TASKS))
    std, fp32_err = perturb_conditioned(model, params, seed_for("adapter/" + case), feed, fields)
    out = run(model, feed, fields)
    for f in fields:
        assert (out[f] - out_base[f]).abs().max().item() > 1e-3, f"{case}: output equals the base output"
    # Each row must depend on its own task: the same rows under another task assignment differ.
    other = run(model, dict(inputs, task_ids=torch.tensor([0, 1, 2])), fields)
    for f in fields:
        for row in range(len(TASK_IDS)):
            assert (other[f][row] - out[f][row]).abs().max().item() > 1e-3, f"{case}: row {row} ignores its task"
    model.set_active_adapters(None)
    for f, t in run(model, inputs, fields).items():
        assert torch.allclose(t, out_base[f], atol=1e-6), f"{case}: inactive adapters change {f}"

    states = {}
    for task in TASKS:
        directory = case_dir / f"adapter_{task}"
        model.save_adapter(str(directory), task)
        states[task] = read_state(weights_file(directory))
    for name in ("lora_A", "lora_B"):  # every checkpoint carries the shared tensors
        for key in (k for k in states["a"] if k.endswith(name)):
            for task in TASKS[1:]:
                assert torch.equal(states["a"][key], states[task][key.replace(".loras.a.", f".loras.{task}.")])

    fresh = load_base(arch, model_dir)
    adapters.init(fresh)
    for task in TASKS:
        assert fresh.load_adapter(str(case_dir / f"adapter_{task}")) == task
    fresh.set_active_adapters(MultiTask(*TASKS))
    fresh.eval()
    out_reload = run(fresh, feed, fields)
    for f in fields:
        assert torch.equal(out_reload[f], out[f]), f"{case}: reloaded (unshared) adapters give different {f}"

    tensors = dict(inputs, task_ids=TASK_IDS)
    tensors.update({f"out.{f}": t for f, t in out.items()})
    tensors.update({f"out_base.{f}": t for f, t in out_base.items()})
    safetensors.torch.save_file(tensors, case_dir / "io.safetensors")
    return {
        "arch": arch,
        "model_class": cls.__name__,
        "method": "mtl_lora",
        "config": {task: MTL_TASKS for task in TASKS},
        "adapters": {task: f"adapter_{task}" for task in TASKS},
        "setup": {"multi_task": TASKS},
        "fusions": [],
        "inputs": ["task_ids"],
        "outputs": fields,
        "reference_setup": "share_parameters(MultiTask('a', 'b', 'c')) before perturbing",
        "attn_implementation": model.config._attn_implementation,
        "perturbation_std": std,
        "fp32_error": float(f"{fp32_err:.3g}"),
        "adapter_keys": keys({k: v for state in states.values() for k, v in state.items()}),  # `.loras.<task>.`
        "versions": versions(),
    }


@torch.no_grad()
def make_single(case: str, model_dir: Path, case_dir: Path) -> dict[str, Any]:
    arch = case.split("__")[0]
    cls, _, fields = ARCHS[arch]
    base = load_base(arch, model_dir)
    inputs = make_inputs(arch, base.config)
    out_base = run(base, inputs, fields)

    model = load_base(arch, model_dir)
    adapters.init(model)
    before = {n for n, _ in model.named_parameters()}
    model.add_adapter("a", config=MTL_GATED)
    params = sorted((n, p) for n, p in model.named_parameters() if n not in before)
    model.eval()
    model.set_active_adapters("a")
    std, fp32_err = perturb_conditioned(model, params, seed_for("adapter/" + case), inputs, fields)
    out = run(model, inputs, fields)
    for f in fields:
        assert (out[f] - out_base[f]).abs().max().item() > 1e-3, f"{case}: output equals the base output"
    model.set_active_adapters(None)
    for f, t in run(model, inputs, fields).items():
        assert torch.allclose(t, out_base[f], atol=1e-6), f"{case}: inactive adapter changes {f}"

    adapter_dir = case_dir / "adapter"
    model.save_adapter(str(adapter_dir), "a")
    state = read_state(weights_file(adapter_dir))
    fresh = load_base(arch, model_dir)
    adapters.init(fresh)
    fresh.set_active_adapters(fresh.load_adapter(str(adapter_dir)))
    fresh.eval()
    for f, t in run(fresh, inputs, fields).items():
        assert torch.equal(t, out[f]), f"{case}: reloaded adapter gives different {f}"

    tensors = dict(inputs)
    tensors.update({f"out.{f}": t for f, t in out.items()})
    tensors.update({f"out_base.{f}": t for f, t in out_base.items()})
    safetensors.torch.save_file(tensors, case_dir / "io.safetensors")
    return {
        "arch": arch,
        "model_class": cls.__name__,
        "adapter_name": "a",
        "method": case.split("__")[1],
        "config": MTL_GATED,
        "outputs": fields,
        "weights_file": weights_file(adapter_dir).name,
        "attn_implementation": model.config._attn_implementation,
        "perturbation_std": std,
        "fp32_error": float(f"{fp32_err:.3g}"),
        "adapter_keys": keys(state),
        "head_keys": [],
        "versions": versions(),
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
        make = make_multi_task if case == "bert__mtl_lora" else make_single
        try:
            meta = make(case, args.out / "models" / case.split("__")[0], case_dir)
        except Exception:
            shutil.rmtree(case_dir)
            raise
        text = re.sub(r"\{[^{}\[\]]*\[[^\]]*\][^{}]*\}", _one_line, json.dumps(meta, indent=2))
        (case_dir / "case.json").write_text(text + "\n")
        print(f"{case}: ok (std {meta['perturbation_std']}, fp32_error {meta['fp32_error']})")


if __name__ == "__main__":
    main()
