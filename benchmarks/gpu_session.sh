#!/usr/bin/env bash
# The GPU measurements of #4-#6 (resnet18), in one command that fits a 10-minute device call.
#
#   EDGEGUARD_DATA_ROOT=<data> OUT=<folder> bash benchmarks/gpu_session.sh [STEP ...]
#
# STEPs (default: all, in this order): env throughput train grid suite ntp map harden eval. Variables above the functions
# choose the pair (SRC, TGT), the NTP configs, the MAP settings and the seeds.
# Each step has its own time limit and a failure does not stop the others; the script skips a step that
# would run past DEADLINE seconds (default 570). Rows go to benchmarks/RESULTS.md (copied to $OUT with logs).
set -u
OUT=${OUT:-/tmp/edgeguard_gpu}
DEADLINE=${DEADLINE:-570}
WORKERS=${WORKERS:-4}
R=${R:-/tmp/edgeguard_r18}
SRC=${SRC:-mnist}                       # source domain (a resnet18 trained by the train step)
TGT=${TGT:-usps}                        # target domain
NTP_CONFIGS=${NTP_CONFIGS:-'{}'}
NTP_ATTACKS=${NTP_ATTACKS:-direct-all/masked,direct-all/free}
NTP_LIMIT=${NTP_LIMIT:-240}
MAP_CONFIG=${MAP_CONFIG:-'{}'}
MAP_SETTINGS=${MAP_SETTINGS:-source-available}
MAP_ATTACKS=${MAP_ATTACKS:-direct-all/masked,direct-all/free}
MAP_LIMIT=${MAP_LIMIT:-200}
SEEDS=${SEEDS:-1}
FIRST_SEED=${FIRST_SEED:-0}
mkdir -p "$OUT" "$R"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 EDGEGUARD_CACHE=${EDGEGUARD_CACHE:-$R/cache}
START=$(date +%s)
EG="python3 -m edgeguard.cli"

step() {  # step LIMIT_S CMD...: run CMD under a time limit unless it would pass the deadline
    local limit=$1; shift
    local now=$(( $(date +%s) - START ))
    if (( now + limit > DEADLINE )); then echo "=== SKIP (t=${now}s, needs ${limit}s): $*"; return; fi
    echo "=== t=${now}s: $*"
    local s=$(date +%s)
    timeout "$limit" "$@"
    echo "=== rc=$? after $(( $(date +%s) - s )) s"
}

run_env() {
    step 60 nvidia-smi -L
    step 60 python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))"
}
run_throughput() {
    step 90 python3 benchmarks/bench_training.py --device cuda --batch 128 --steps 50
    step 90 python3 benchmarks/bench_training.py --device cuda --batch 4096 --steps 20 --archs resnet18
}
run_train() {
    local ep=""
    [[ $SRC == mnist ]] && ep="--epochs 3"   # 180k images reach 99.5 %; the others take the default (~300k)
    step 150 $EG train --arch resnet18 --domain "$SRC" $ep --out "$R/r18_$SRC.safetensors" --device cuda
}
run_ntp() {  # one row per config in NTP_CONFIGS ('|'-separated JSON overrides)
    local i=0 cfg
    IFS='|' read -ra cfgs <<< "$NTP_CONFIGS"
    for cfg in "${cfgs[@]}"; do
        i=$((i + 1))
        step "$NTP_LIMIT" python3 benchmarks/bench_protect.py --method ntp --source "$R/r18_$SRC.safetensors" \
            --target "$TGT" --seeds "$SEEDS" --executor processes --workers "$WORKERS" --device cuda --out "$R/ntp$i" --config "$cfg" \
            --attacks "$NTP_ATTACKS"
    done
}
run_map() {  # one row per setting in MAP_SETTINGS and seed
    local setting
    for setting in $MAP_SETTINGS; do
        step "$MAP_LIMIT" python3 benchmarks/bench_protect.py --method map --setting "$setting" \
            --source "$R/r18_$SRC.safetensors" --target "$TGT" --seeds "$SEEDS" --first-seed "$FIRST_SEED" \
            --executor processes --workers "$WORKERS" --device cuda --out "$R/map" --config "$MAP_CONFIG" --attacks "$MAP_ATTACKS"
    done
}
run_grid() {
    step 200 python3 benchmarks/bench_eval_grid.py "$R/r18_$SRC.safetensors" --target "$TGT" --workers 1 "$WORKERS" \
        --device cuda
}
run_suite() {  # #17/#18: three seeds x the standard suite on resnet18 (target <= 60 s on an H100)
    step 200 $EG evaluate "$R/r18_$SRC.safetensors" --target "$TGT" --suite standard --seeds 3 \
        --report "$R/r18_${SRC}_${TGT}_standard" --device cuda --json
}
run_harden() {  # #19: harden resnet18 (dense) and judge it by the robust suite; HARDEN_SET: extra --set KEY=VALUE
    step 420 python3 benchmarks/bench_harden.py "$R/r18_$SRC.safetensors" --source-model "$R/r18_$SRC.safetensors" \
        --target "$TGT" --weights 0,1 --device cuda --reports "$R" ${HARDEN_SET:-}
}
run_eval() {  # #4's "done when": a readable report of the unprotected resnet18 against USPS
    step 120 $EG evaluate "$R/r18_$SRC.safetensors" --target "$TGT" --attack direct-all/masked --attack direct-all/free \
        --report "$R/r18_${SRC}_${TGT}_report" --workers "$WORKERS" --device cuda
}
steps=("$@")
(( ${#steps[@]} )) || steps=(env throughput train grid suite ntp map harden eval)
for s in "${steps[@]}"; do "run_$s"; done 2>&1 | tee "$OUT/gpu_session.log"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
(cd "$R" && find . -path ./cache -prune -o -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.jsonl' \) \
    -print | tar czf "$OUT/reports.tgz" -T -)
echo "=== done at t=$(( $(date +%s) - START ))s"
