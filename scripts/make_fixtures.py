"""Generate the reference fixtures (tests/fixtures/reference) from AdapterHub ``adapters`` 1.3.0 and PEFT.

One generator, one case table per family (scripts/fixtures/<family>.py); docs/fixtures.md describes the
layout and the checks every case passes. Run from the repository root with the reference environment (CPU,
deterministic, no Hub access: the tiny base models are built from configs)::

    /work/refvenv/bin/python scripts/make_fixtures.py --build-models          # models + every case
    /work/refvenv/bin/python scripts/make_fixtures.py --family bottleneck     # one family's cases
    /work/refvenv/bin/python scripts/make_fixtures.py bert__seq_bn gpt2__ia3  # named cases
    /work/refvenv/bin/python scripts/make_fixtures.py --list

Only the cases named (by default every case) are replaced under ``--out``; other case directories are left
alone, and the base models are read from ``--models`` unless ``--build-models`` (re)writes them there first.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch
from fixtures import bottleneck, composition, composition_unions, core, lora_family, mtl_lora, prefix_reft, union
from fixtures.common import ARCHS, build_base_model, write_case_json

# The families in the order they are built (each one's cases in table order).
FAMILIES = {"core": core.CASES, "bottleneck": bottleneck.CASES, "lora_family": lora_family.CASES,
            "prefix_reft": prefix_reft.CASES, "union": union.CASES, "mtl_lora": mtl_lora.CASES,
            "composition": composition.CASES, "composition_unions": composition_unions.CASES}


def selected(families: list[str] | None, names: list[str]) -> list[tuple[str, object]]:
    """(case name, case) for the named cases, else for every case of the chosen families (default: all)."""
    tables = {f: FAMILIES[f] for f in families or FAMILIES}
    every = {name: case for table in tables.values() for name, case in table.items()}
    unknown = [n for n in names if n not in every]
    if unknown:
        sys.exit(f"unknown case(s) {unknown} in families {list(tables)}; see --list")
    return [(name, every[name]) for name in names] if names else list(every.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/reference"))
    parser.add_argument("--models", type=Path, help="the saved tiny base models (default: OUT/models)")
    parser.add_argument("--build-models", action="store_true", help="(re)build the base models first")
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="only this family (repeatable)")
    parser.add_argument("--list", action="store_true", help="list every family's cases and exit")
    parser.add_argument("cases", nargs="*", help="case names to rebuild (default: all cases of the families)")
    args = parser.parse_args()
    if args.list:
        for family, table in FAMILIES.items():
            print(f"{family} ({len(table)}): {' '.join(table)}")
        return
    models = args.models or args.out / "models"
    torch.set_num_threads(1)  # bit-reproducible reductions
    torch.use_deterministic_algorithms(True)
    # Expected when computing the adapters-inactive output; silence the per-forward warning.
    logging.getLogger("adapters.model_mixin").setLevel(logging.ERROR)

    if args.build_models:
        for arch in ARCHS:
            shutil.rmtree(models / arch, ignore_errors=True)
            build_base_model(arch, models / arch)
    cases = selected(args.family, args.cases)
    missing = sorted({str(models / case.arch) for _, case in cases if not (models / case.arch).is_dir()})
    if missing:
        sys.exit(f"no base model in {missing}: pass --models DIR (e.g. tests/fixtures/reference/models) "
                 "or --build-models")
    for name, case in cases:
        case_dir = args.out / "cases" / name
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        try:
            meta = case.build(name, models / case.arch, case_dir)
        except Exception:
            shutil.rmtree(case_dir)  # no half-written case
            raise
        write_case_json(case_dir, meta, case.compact_json)
        keys = f"{len(meta['adapter_keys'])} adapter tensors, " if "adapter_keys" in meta else ""
        print(f"{name}: {keys}attn={meta['attn_implementation']}")


if __name__ == "__main__":
    main()
