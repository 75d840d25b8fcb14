#!/usr/bin/env bash
# The GPU measurements of #4-#6 (resnet18), in one command that fits a 10-minute device call.
#
#   EDGEGUARD_DATA_ROOT=<data> OUT=<folder> bash benchmarks/gpu_session.sh [--dry-run] [STEP ...]
#
# STEPs (default: all, in this order): env throughput train grid suite ntp map harden eval camera. Variables above the functions
# choose the pair (SRC, TGT), the NTP configs, the MAP settings and the seeds.
# Each step has its own time limit and a failure does not stop the others; the script skips a step that
# would run past DEADLINE seconds (default 570) and exits 1 when a step failed. Rows go to benchmarks/RESULTS.md
# (copied to $OUT with logs).
# --dry-run: every step on the CPU with tiny settings (small_cnn on the embedded samples, a step or two of each
# loop), rows to $OUT/RESULTS.dry-run.md, so the script cannot rot between GPU sessions (tests/test_gpu_session.py).
set -u
DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
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
DEV=cuda ARCH=resnet18 TRAIN_EPOCHS="" STEPS_SCALE=1 GRID_ARGS="" EPOCHS_GRID=30 SUITE=standard SUITE_SEEDS=3
EXECUTOR=processes
HARDEN_TINY="" LIMIT_SCALE=1
CAMERA_ARGS=${CAMERA_ARGS-"--archs resnet18 --sizes 224 --epochs 30"}  # empty: skip the reference-model step
CAMERA_MAP=${CAMERA_MAP:-"--arch resnet18 --size 224 --epochs 30"} CAMERA_SET=${CAMERA_SET:-}
CAMERA_SETTINGS=${CAMERA_SETTINGS:-source-available source-free data-free}  # #29's row, then #32's PACS rows
if (( DRY )); then
    DEV=cpu ARCH=small_cnn SRC=mnist_sample TGT=usps_sample TRAIN_EPOCHS="--epochs 1" STEPS_SCALE=0 EPOCHS_GRID=1
    GRID_ARGS="--grid 0.05,0.2" SUITE=paper SUITE_SEEDS=1 WORKERS=1 EXECUTOR=local DEADLINE=${DRY_DEADLINE:-1800}
    NTP_ATTACKS=direct-all/free MAP_ATTACKS=direct-all/free  # worker processes: the grid step runs them
    NTP_CONFIGS='{"iterations":1,"recovery_epochs":1,"head_epochs":1,"source_fraction":0.1,"target_fraction":0.1}'
    MAP_CONFIG='{"epochs":1,"repair_epochs":1}'
    HARDEN_TINY="--suite paper --csv $OUT/harden_frontier.csv --set outer_steps=2 --set eval_every=1 --set attacks=1
        --set inner_steps=2 --set suppress_every=1 --set proxy_steps=2"
    CAMERA_ARGS="" CAMERA_MAP="--arch small_cnn --size 64 --epochs 1 --seeds 0 --targets pacs_art"
    CAMERA_SET="epochs=1 repair_epochs=0 max_source=256 max_target=256 synth.n=32 synth.iterations=2
        synth.student_steps=1"
    CAMERA_SETTINGS=source-free  # the synthesis path; source-available MAP is the same bench code
    export EDGEGUARD_RESULTS=$OUT/RESULTS.dry-run.md
fi
mkdir -p "$OUT" "$R"
rm -f "$OUT/failed_steps"
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
    local rc=$?
    echo "=== rc=$rc after $(( $(date +%s) - s )) s"
    (( rc == 0 )) || echo "$*" >> "$OUT/failed_steps"
}

run_env() {
    (( DRY )) || step 60 nvidia-smi -L
    step 60 python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
}
run_throughput() {  # the dry run measures one batch size (the large one is the same code)
    step 90 python3 benchmarks/bench_training.py --device $DEV --batch 128 --steps $(( 50 * STEPS_SCALE + 2 )) --archs small_cnn,$ARCH
    (( DRY )) || step 90 python3 benchmarks/bench_training.py --device $DEV --batch 4096 --steps 20 --archs $ARCH
}
run_train() {
    local ep=$TRAIN_EPOCHS
    [[ $SRC == mnist ]] && ep="--epochs 3"   # 180k images reach 99.5 %; the others take the default (~300k)
    step 150 $EG train --arch $ARCH --domain "$SRC" $ep --out "$R/r18_$SRC.safetensors" --device $DEV
}
run_ntp() {  # one row per config in NTP_CONFIGS ('|'-separated JSON overrides)
    local i=0 cfg
    IFS='|' read -ra cfgs <<< "$NTP_CONFIGS"
    for cfg in "${cfgs[@]}"; do
        i=$((i + 1))
        step "$NTP_LIMIT" python3 benchmarks/bench_protect.py --method ntp --source "$R/r18_$SRC.safetensors" \
            --target "$TGT" --seeds "$SEEDS" --executor $EXECUTOR --workers "$WORKERS" --device $DEV --out "$R/ntp$i" --config "$cfg" \
            --attacks "$NTP_ATTACKS" $GRID_ARGS
    done
}
run_map() {  # one row per setting in MAP_SETTINGS and seed
    local setting
    for setting in $MAP_SETTINGS; do
        step "$MAP_LIMIT" python3 benchmarks/bench_protect.py --method map --setting "$setting" \
            --source "$R/r18_$SRC.safetensors" --target "$TGT" --seeds "$SEEDS" --first-seed "$FIRST_SEED" \
            --executor $EXECUTOR --workers "$WORKERS" --device $DEV --out "$R/map" --config "$MAP_CONFIG" --attacks "$MAP_ATTACKS" \
            $GRID_ARGS
    done
}
run_grid() {
    step 200 python3 benchmarks/bench_eval_grid.py "$R/r18_$SRC.safetensors" --target "$TGT" --epochs $EPOCHS_GRID \
        --device $DEV $GRID_ARGS $( (( DRY )) && echo --variants processes)
}
run_suite() {  # #17/#18: three seeds x the standard suite on resnet18 (target <= 60 s on an H100)
    step 200 $EG evaluate "$R/r18_$SRC.safetensors" --target "$TGT" --suite $SUITE --seeds $SUITE_SEEDS $GRID_ARGS \
        --report "$R/r18_${SRC}_${TGT}_standard" --device $DEV --json
}
run_harden() {  # #19: harden resnet18 (dense) and judge it by the robust suite; HARDEN_SET: extra --set KEY=VALUE
    step 420 python3 benchmarks/bench_harden.py "$R/r18_$SRC.safetensors" --source-model "$R/r18_$SRC.safetensors" \
        --target "$TGT" --weights 0,1 --device $DEV --reports "$R" $GRID_ARGS $HARDEN_TINY ${HARDEN_SET:-}
}
run_eval() {  # #4's "done when": a readable report of the unprotected resnet18 against USPS
    step 120 $EG evaluate "$R/r18_$SRC.safetensors" --target "$TGT" --attack direct-all/masked --attack direct-all/free \
        --report "$R/r18_${SRC}_${TGT}_report" --workers "$WORKERS" --device $DEV $GRID_ARGS $( (( DRY )) && echo --epochs 1)
}
run_camera() {  # #29's and #32's 224-px rows: the source model, then MAP on PACS in each of CAMERA_SETTINGS (needs
    # pacs/ in the data root: photo + art + cartoon, so carry them alone, e.g. EDGEGUARD_DATA_ROOT=gpu_data with
    # gpu_data/pacs/{photo,art_painting,cartoon}). #32 alone in one call:
    #   CAMERA_ARGS= CAMERA_MAP="--arch resnet18 --size 224 --epochs 30 --seeds 0" CAMERA_SETTINGS=source-free \
    #       bash benchmarks/gpu_session.sh camera      (then data-free, then seeds 1 and 2: one call each, unmeasured)
    if [[ ! -d ${EDGEGUARD_DATA_ROOT:-/nonexistent}/pacs/photo ]]; then echo "=== SKIP camera: no pacs/ in the data root"; return; fi
    [[ -n $CAMERA_ARGS ]] && step 240 python3 benchmarks/bench_camera.py ref $CAMERA_ARGS  # the dry run: map trains one
    local setting
    for setting in $CAMERA_SETTINGS; do
        step 270 python3 benchmarks/bench_camera.py map $CAMERA_MAP --set setting=$setting $CAMERA_SET
    done
}
steps=("$@")
(( ${#steps[@]} )) || steps=(env throughput train grid suite ntp map harden eval camera)
for s in "${steps[@]}"; do "run_$s"; done 2>&1 | tee "$OUT/gpu_session.log"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
(cd "$R" && find . -path ./cache -prune -o -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.jsonl' \) \
    -print | tar czf "$OUT/reports.tgz" -T -)
echo "=== done at t=$(( $(date +%s) - START ))s"
if [[ -s "$OUT/failed_steps" ]]; then echo "=== failed steps:"; cat "$OUT/failed_steps"; exit 1; fi
