#!/usr/bin/env bash
# Installs kvcascade with its models and test tools into the Python that runs it (python3, or $PYTHON; a virtual
# environment if one is active). CPU machines get torch 2.13.0 (CPU build) unless a torch is already importable;
# a GPU machine keeps the torch it has. KVCASCADE_TRANSFORMERS=X.Y.Z pins transformers (CI tests the oldest
# release pyproject.toml allows this way; by default pip takes the newest the range allows).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[qwen,gemma,plot,serve,test]" ${KVCASCADE_TRANSFORMERS:+"transformers==$KVCASCADE_TRANSFORMERS"}
