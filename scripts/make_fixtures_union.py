"""Reference fixtures for union configs (AdapterHub ConfigUnion), from `adapters` 1.3.0.

Cases: `bert__mam` (prefix tuning, bottleneck 800, + parallel adapter), `bert__union_lora_seq_bn`
(`lora[r=4,alpha=8]|seq_bn`) and UniPELT (gated prefix tuning + gated seq_bn + gated LoRA) on BERT and
a classification model, in the layout of make_reference_fixtures.py (whose `make_case` builds
them). Run from the repository root in the reference venv (see make_reference_fixtures.py):

    .refvenv/bin/python scripts/make_fixtures_union.py --out tests/fixtures/reference
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import make_reference_fixtures as ref  # noqa: E402

CASES = {("bert", "mam"): "mam", ("bert", "union_lora_seq_bn"): "lora[r=4,alpha=8]|seq_bn",
         ("bert", "unipelt"): "unipelt", ("bert_seqcls", "unipelt"): "unipelt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/reference"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    logging.getLogger("adapters.model_mixin").setLevel(logging.ERROR)
    for (arch, method), config in CASES.items():
        ref.METHODS[method] = config
        case_dir = args.out / "cases" / f"{arch}__{method}"
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        meta = ref.make_case(arch, method, args.out / "models" / arch, case_dir)
        text = re.sub(r"\{[^{}\[\]]*\[[^\]]*\][^{}]*\}", ref._one_line, json.dumps(meta, indent=2))
        (case_dir / "case.json").write_text(text + "\n")
        print(f"{case_dir.name}: {len(meta['adapter_keys'])} adapter tensors")


if __name__ == "__main__":
    main()
