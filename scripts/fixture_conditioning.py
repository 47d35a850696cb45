"""Measure each single-adapter reference fixture's own float32 rounding error, |out_fp32 - out_fp64|.

A fixture can only check a tolerance that float32 rounding alone does not use up; docs/fixtures.md
("Conditioning") explains the limit (a quarter of the 1e-5 parity tolerance) and why it exists.

Run in the reference venv (see scripts/make_fixtures.py), from the repository root::

    .refvenv/bin/python scripts/fixture_conditioning.py

Cases that cannot be rebuilt from their AdapterHub checkpoint alone are listed as skipped with the
reason (PEFT checkpoints, adapters whose modules do not convert to float64, optional dependencies).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import adapters
import safetensors.torch
import torch
import transformers

LIMIT = 2.5e-6


def outputs(case: Path, root: Path, info: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The case's outputs with its adapter loaded into a fresh base model, computed in `dtype`."""
    model = getattr(transformers, info["model_class"]).from_pretrained(root / "models" / info["arch"],
                                                                        dtype=torch.float32).eval()
    adapters.init(model)
    model.set_active_adapters(model.load_adapter(str(case / "adapter")))
    model.to(dtype).eval()
    io = safetensors.torch.load_file(case / "io.safetensors")
    with torch.no_grad():
        out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"])
    return {f: getattr(out, f).double() for f in info["outputs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("tests/fixtures/reference"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("adapters").setLevel(logging.ERROR)
    over = []
    for case in sorted((args.root / "cases").iterdir()):
        info = json.loads((case / "case.json").read_text())
        if "adapters" in info:  # compositions: several adapters and a setup, not rebuilt here
            continue
        try:
            exact, fp32 = (outputs(case, args.root, info, d) for d in (torch.float64, torch.float32))
        except (OSError, RuntimeError, ImportError) as error:
            print(f"{case.name:36s} skipped: {type(error).__name__}: {str(error).splitlines()[0][:70]}")
            continue
        err = max((fp32[f] - exact[f]).abs().max().item() for f in info["outputs"])
        scale = max(exact[f].abs().max().item() for f in info["outputs"])
        flag = "  OVER LIMIT" if err > LIMIT else ""
        print(f"{case.name:36s} fp32 error {err:.2e}   max|out| {scale:5.2f}{flag}")
        if err > LIMIT:
            over.append(case.name)
    print(f"\n{len(over)} case(s) over {LIMIT:.1e}" + (f": {', '.join(over)}" if over else ""))


if __name__ == "__main__":
    main()
