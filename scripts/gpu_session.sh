#!/usr/bin/env bash
# Runs on the lent GPU machine (see docs/results/README.md). Assumes the GGUF pieces were copied to ~/m/
# (one piece per call, from .models42/, made with: split -b 42M -d -a 2 <gguf> .models42/q.part, so that a
# piece and the working tree fit one call) and the gguf
# wheel is carried in .whl/. Outputs go to $OUT. Usage: bash scripts/gpu_session.sh MODE, MODE one of
#   setup          assemble + convert the default model
#   check          GPU kernel tests, host-sync check, kernel + decode benchmarks (short table last)
#   attention      bench attention (T = ${LENGTHS:-32k,128k,512k,1m})
#   e2e            bench e2e (1M-token prompt, cascade budget 8K; full cache at 32K)
#   interlayer     calibrate inter-layer groups (regrouped at 0.3/0.7 too), then KJV-NT perplexity at 32K, passkey and
#                  niah_single on prose at 8K/32K for full and interlayer (delta x proximal window); into $OUT/interlayer
#   decode         GPU tests of CUDA graphs and batching, then bench generate (4K/32K, per policy, batches 8/32)
#   share          cross-layer selection (share=none|group|all): passkey and the prose needle at 64K/256K
#   serve          scripts/serve_load.py: $REQUESTS concurrent $PROMPT-token prompts, $POLICIES vs full
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
    cat ~/m/q.part* > "$KVCASCADE_HOME/gguf/qwen2.5-coder-0.5b-instruct.gguf"
    sha256sum "$KVCASCADE_HOME/gguf/qwen2.5-coder-0.5b-instruct.gguf"
    python3 -c "import kvcascade; print(kvcascade.prepare('qwen2.5-coder-0.5b', progress=False))" ;;
  check)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -m pytest -q tests/test_triton.py -p no:cacheprovider 2>&1 | tail -4
    python3 scripts/sync_check.py || true
    $KV bench kernel --out "$OUT/bench_kernel.json" 2>/dev/null
    $KV bench decode --out "$OUT/bench_decode.json" 2>/dev/null ;;
  interlayer)
    D=$OUT/interlayer; mkdir -p $D ~/ev
    G=~/ev/groups.json
    [ -f $G ] || $KV calibrate interlayer --device cuda --quiet --samples "${SAMPLES:-64}" --out $G 2>&1 | tail -3
    cp $G $D/groups-0.5.json
    for d in 0.3 0.7; do $KV calibrate interlayer --regroup $G --delta $d --out $D/groups-$d.json 2>&1 | tail -1; done
    python3 -c "
import json,sys
for d in ('0.3','0.5','0.7'):
    g=json.load(open('$D/groups-'+d+'.json'))['groups']
    print('delta',d,'blocks per KV head',[len(b) for b in g])"
    P=full
    for d in 0.3 0.5 0.7; do for r in 1008 4080; do P="$P,interlayer:groups=$D/groups-$d.json:recent=$r"; done; done
    timeout ${TLIM1:-300} $KV eval ppl --device cuda --quiet --text kjv:nt --policies "$P" --lengths 32k --chunk-size 1024 \
      --out ~/ev/il_ppl 2>&1 | tail -14 || true
    cp ~/ev/il_ppl/results.jsonl $D/ppl_results.jsonl 2>/dev/null || true
    P2="full,interlayer:groups=$D/groups-0.5.json:recent=1008,interlayer:groups=$D/groups-0.3.json:recent=1008"
    timeout ${TLIM2:-240} $KV eval passkey,niah_single:haystack=prose --device cuda --quiet --haystack-file kjv:nt \
      --policies "$P2" --lengths 8k,32k --samples ${NSAMP:-10} --chunk-size 1024 --workers 8 --out ~/ev/il_needle 2>&1 | tail -20 || true
    cp ~/ev/il_needle/results.jsonl $D/needle_results.jsonl 2>/dev/null || true ;;
  decode)
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_triton.py 2>&1 | tail -4
    $KV bench generate --lengths "${LENGTHS:-4k,32k}" --budget "${BUDGET:-2048}" --new-tokens "${NEW:-128}" \
      --policies "${POLICIES:-full,streaming,h2o,snapkv,locret,locret:decode_window=1,cascade}" \
      --batches "${BATCHES:-8,32}" --out "$OUT/bench_generate.json" 2>/dev/null ;;
  share)
    P="cascade,cascade:share=group,cascade:share=all,h2o,h2o:share=group,locret,locret:share=group"
    for task in passkey niah_single:haystack=prose; do
      mkdir -p ~/ev
      timeout "${TLIM:-280}" $KV eval $task --device cuda --quiet --policies "${POLICIES:-$P}" --budgets "${BUDGETS:-4096}" \
        --lengths "${LENGTHS:-64k,256k}" --samples "${SAMPLES:-10}" --chunk-size 1024 --workers 8 --haystack-file kjv:nt \
        --out ~/ev/share_${task%%:*} 2>&1 | tail -30 || true
      mkdir -p $OUT/share_${task%%:*}; cp ~/ev/share_${task%%:*}/results.jsonl $OUT/share_${task%%:*}/ 2>/dev/null || true
    done ;;
  serve)
    python3 scripts/serve_load.py --device cuda --requests "${REQUESTS:-32}" --prompt-tokens "${PROMPT:-32000}" \
      --max-tokens "${NEW:-32}" --policies "${POLICIES:-locret,full}" --budget "${BUDGET:-4096}" --out "$OUT/serve_load.json" ;;
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
