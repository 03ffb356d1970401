#!/usr/bin/env bash
# One command that checks gptlab on a GPU (or, with --cpu, the same checks on the CPU, as CI runs them).
# It prints PASS / FAIL / SKIP per check and a summary, and exits non-zero if a check failed; see gpu_check.py.
# Python: $PYTHON if set, else the project's .venv, else python3; gptlab is imported from src/ either way.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
