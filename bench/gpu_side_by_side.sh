#!/usr/bin/env bash
# bench/gpu_side_by_side.sh: bench/side_by_side.py's GPU mode (--device cuda), prepared and run in ONE call
# on a bare GPU machine (issue #11, item 4; docs/performance.md, "GPU").
#
#   bench/gpu_side_by_side.sh fetch       here, with a network, once: the reference stack's wheels -> .whl/
#   bench/gpu_side_by_side.sh [ARGS...]   on the GPU machine, from the repository root; the device tool:
#                                         run(command="bash bench/gpu_side_by_side.sh", carry=[".whl"],
#                                         timeout_s=600). ARGS go to side_by_side.py (--only fuse,
#                                         --batches 32, --modes eager, --reps 30, ...; a later --device wins)
#
# The device image's python3 (torch 2.11, transformers 5.17, no `adapters`; nothing can be downloaded there)
# runs two ways:
#   - fxadapt compiles with the image's own packages: fxadapt is installed from this checkout with
#     --no-deps into /tmp/fxadapt_site, and side_by_side.py calls it by subprocess with that PYTHONPATH;
#   - the reference models (and the timing process) use adapters 1.3.0 + PEFT 0.21.2 + transformers 4.57.6
#     from the carried wheels, installed into /tmp/fxadapt_ref_site, ahead of the image's packages for that
#     process only (adapters 1.3.0 does not run on transformers 5).
# Every step prints what it did or why it could not; a missing piece turns the rows it affects into
# "not available: <why>" instead of ending the call. The whole output is also written to $OUT/ (the device
# tool brings that folder back) or /tmp.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(adapters==1.3.0 peft==0.21.2 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2)

if [ "${1:-}" = fetch ]; then
    # The device's python is 3.12 on x86-64 (KINDS.md); tokenizers is the only binary wheel (abi3).
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

LOG=${OUT:-/tmp}/gpu_side_by_side.log
FXSITE=/tmp/fxadapt_site
REFSITE=/tmp/fxadapt_ref_site
BUDGET=${BUDGET_S:-400}  # seconds after which side_by_side.py starts no more torch.compile warm-ups
{
    echo "== machine"
    nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available(), "transformers", transformers.__version__)' 2>&1

    echo "== fxadapt from this checkout, on the image's packages (--no-deps)"
    # Built from a copy: setuptools leaves build/ and fxadapt.egg-info behind in the tree it builds.
    rm -rf "$FXSITE" /tmp/fxadapt_src && mkdir -p /tmp/fxadapt_src &&
        cp -r fxadapt passes tools setup.py pyproject.toml README.md /tmp/fxadapt_src/
    if "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-build-isolation \
        --target "$FXSITE" /tmp/fxadapt_src 2>&1 &&
        PYTHONPATH=$FXSITE "$PY" -c 'import fxadapt.cli, fxadapt.passes' 2>&1; then
        echo "fxadapt: installed in $FXSITE"
    else
        echo "fxadapt: could not be installed or imported (above); the compiles will fail and the rows say so"
    fi

    echo "== reference stack (${WHEELS[*]})"
    rm -rf "$REFSITE"
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --target "$REFSITE" .whl/*.whl 2>&1 ||
            echo "reference stack: pip could not install the carried wheels (above)"
    else
        echo "reference stack: no wheels in .whl/ (run 'bench/gpu_side_by_side.sh fetch' where there is a network" \
             "and carry .whl); using whatever the image has"
    fi
    PYTHONPATH=$REFSITE "$PY" -c 'import adapters, peft, transformers
print("reference stack: adapters", adapters.__version__, "peft", peft.__version__, "transformers",
      transformers.__version__)' 2>&1 || echo "reference stack: not importable (above); every row will say so"

    echo "== side_by_side.py --device cuda (budget ${BUDGET}s for torch.compile warm-ups)"
    # 600 s is the device tool's limit for one command: stop in time to keep the log.
    PYTHONPATH=$REFSITE PYTHONUNBUFFERED=1 timeout $((585 - SECONDS)) "$PY" bench/side_by_side.py --device cuda \
        --budget-s "$BUDGET" --fxadapt "env PYTHONPATH=$FXSITE $PY -m fxadapt.cli" "$@"
    status=$?
    [ "$status" = 124 ] && echo "== stopped by the time limit (timings not reached; try --only or --modes eager)"
    echo "== exit $status after ${SECONDS}s"
} 2>&1 | tee "$LOG"
