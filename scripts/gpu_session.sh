#!/usr/bin/env bash
# Runs on the lent GPU machine (see docs/results/README.md). Assumes the GGUF pieces were copied to ~/m/
# (one piece per call, from .models/, made with: split -b 55M -d -a 2 <gguf> .models/q.part) and the gguf
# wheel is carried in .whl/. Usage: bash scripts/gpu_session.sh setup | passkey4k | longctx | ppl
set -euo pipefail
export PYTHONUNBUFFERED=1 KVCASCADE_HOME=$HOME/kvh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
case "$1" in
  setup)
    mkdir -p "$KVCASCADE_HOME/gguf"
    cat ~/m/q.part0* > "$KVCASCADE_HOME/gguf/qwen2.5-coder-0.5b-instruct.gguf"
    sha256sum "$KVCASCADE_HOME/gguf/qwen2.5-coder-0.5b-instruct.gguf"
    python3 -c "import kvcascade; print(kvcascade.prepare('qwen2.5-coder-0.5b', progress=False))" ;;
  passkey4k)
    python3 scripts/passkey_grid.py --device cuda --lengths 4k --budgets 512,2048 --samples 10 \
      --policies full,window,streaming,h2o,tova,snapkv,pyramidkv,cascade --out "$OUT/passkey_4k_gpu.jsonl" ;;
  longctx)
    python3 scripts/passkey_grid.py --device cuda --lengths "${LENGTHS:-16k,64k}" --budgets 4096,8192 \
      --samples "${SAMPLES:-10}" --policies "${POLICIES:-full,streaming,cascade}" --out "$OUT/passkey_long_gpu.jsonl" ;;
  variants)
    python3 scripts/passkey_grid.py --device cuda --lengths "${LENGTHS:-4k,16k}" --budgets "${BUDGETS:-2048,8192}" \
      --samples "${SAMPLES:-10}" --policies "$POLICIES" ${DEPTH:+--depth $DEPTH} --out "$OUT/${NAME:-passkey_variants_gpu}.jsonl" ;;
  ppl)
    python3 scripts/ppl.py --device cuda --text .data/kjv.txt --budget 8192 --policies "${POLICIES:-cascade,streaming,window}" \
      --max-tokens "${MAX_TOKENS:-0}" --out "$OUT/ppl_kjv_gpu.json" ;;
esac
