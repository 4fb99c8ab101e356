#!/usr/bin/env bash
# Runs on the lent GPU machine (see docs/results/README.md). Assumes the GGUF pieces were copied to ~/m/
# (one piece per call, from .models/, made with: split -b 55M -d -a 2 <gguf> .models/q.part) and the gguf
# wheel is carried in .whl/. Outputs go to $OUT. Usage: bash scripts/gpu_session.sh MODE, MODE one of
#   setup          assemble + convert the default model
#   check          GPU kernel tests, host-sync check, kernel + decode benchmarks (short table last)
#   attention      bench attention (T = ${LENGTHS:-32k,128k,512k,1m})
#   e2e            bench e2e (1M-token prompt, cascade budget 8K; full cache at 32K)
#   eval TASKS     kvcascade eval TASKS with $POLICIES $BUDGETS $LENGTHS $SAMPLES $CHUNK $WORKERS $HAYSTACK $DEPTHS
#                  into ~/ev/$NAME (resumable), results.jsonl + summary.md copied to $OUT/$NAME
set -euo pipefail
export PYTHONUNBUFFERED=1 KVCASCADE_HOME=$HOME/kvh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
KV="python3 -m kvcascade.cli"
case "$1" in
  setup)
    mkdir -p "$KVCASCADE_HOME/gguf"
    cat ~/m/q.part0* > "$KVCASCADE_HOME/gguf/qwen2.5-coder-0.5b-instruct.gguf"
    sha256sum "$KVCASCADE_HOME/gguf/qwen2.5-coder-0.5b-instruct.gguf"
    python3 -c "import kvcascade; print(kvcascade.prepare('qwen2.5-coder-0.5b', progress=False))" ;;
  check)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -m pytest -q tests/test_triton.py -p no:cacheprovider 2>&1 | tail -4
    python3 scripts/sync_check.py || true
    $KV bench kernel --out "$OUT/bench_kernel.json" 2>/dev/null
    $KV bench decode --out "$OUT/bench_decode.json" 2>/dev/null ;;
  attention)
    $KV bench attention --lengths "${LENGTHS:-32k,128k,512k,1m}" ${METHODS:+--methods $METHODS} --out "$OUT/bench_attention.json" ;;
  e2e)
    $KV bench e2e --lengths "${LENGTHS:-1m}" --chunk-size "${CHUNK:-4096}" --full-lengths "${FULL:-32k}" --out "$OUT/bench_e2e.json" ;;
  eval)  # results live in ~/ev/NAME (kept while the machine stays warm, so a timed-out grid resumes); results.jsonl
         # and summary.md are copied to $OUT (rebuild the plots locally with kvcascade report)
    mkdir -p ~/ev
    timeout "${TLIM:-560}" $KV eval "$2" --device cuda --quiet --policies "${POLICIES:-full,window,streaming,h2o,tova,snapkv,pyramidkv}" \
      --budgets "${BUDGETS:-2048,8192}" --lengths "${LENGTHS:-4k}" --samples "${SAMPLES:-5}" --chunk-size "${CHUNK:-1024}" \
      --workers "${WORKERS:-1}" ${TEXT:+--text $TEXT} ${HAYSTACK:+--haystack-file $HAYSTACK} ${DEPTHS:+--depths $DEPTHS} \
      --out ~/ev/"${NAME:-eval}" 2>&1 | tail -${TAIL:-60} || true
    [ -f ~/ev/"${NAME:-eval}"/results.jsonl ] && $KV report ~/ev/"${NAME:-eval}" >/dev/null 2>&1 || true
    mkdir -p "$OUT/${NAME:-eval}"
    cp ~/ev/"${NAME:-eval}"/results.jsonl ~/ev/"${NAME:-eval}"/summary.md "$OUT/${NAME:-eval}/" 2>/dev/null || true
    ls ~/ev/"${NAME:-eval}"/worker-*.log >/dev/null 2>&1 && tail -3 ~/ev/"${NAME:-eval}"/worker-*.log || true
    wc -l ~/ev/"${NAME:-eval}"/results.jsonl ;;
esac
