"""Print max abs error per format over all reference fixtures (adapters 1.3.0 outputs).

    python bench/parity_report.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from conftest import reference_cases  # noqa: E402
from reference_eval import FORMATS, evaluate_case  # noqa: E402


def main() -> None:
    worst = dict.fromkeys(FORMATS, 0.0)
    cases = reference_cases()
    print(f"{'case':<30}" + "".join(f"{f:>14}" for f in FORMATS) + f"{'adapter effect':>16}")
    for case in cases:
        with tempfile.TemporaryDirectory() as tmp:
            _, errors, change = evaluate_case(case, Path(tmp) / "out")
        worst = {f: max(worst[f], errors[f][0]) for f in FORMATS}
        print(f"{case:<30}" + "".join(f"{errors[f][0]:>14.2e}" for f in FORMATS) + f"{change:>16.2e}")
    print(f"{len(cases)} fixtures; max abs error: " + ", ".join(f"{f} {worst[f]:.2e}" for f in FORMATS))


if __name__ == "__main__":
    main()
