#!/usr/bin/env bash
# The GPU checks of tspeft, on a machine with CUDA and a preinstalled torch and no internet (< 8 minutes on one GPU).
#
#   bash scripts/gpu_check.sh                     # results in benchmarks/results/gpu-<device name>/
#   RESULTS=/some/dir bash scripts/gpu_check.sh   # results in /some/dir/gpu-<device name>/
#
# Steps (each under its own time limit; a failed step is recorded and the next one runs):
#   env        packages: the wheels of wheels/ (scripts/fetch_gpu_wheels.sh, run beforehand where PyPI is
#              reachable) unpacked into a site folder first on PYTHONPATH (scripts/gpu_env.sh); torch stays the
#              machine's own
#   cuda-tests pytest -m cuda tests/test_cuda.py: the gate on CUDA in fp32/bf16/fp16 (τ = 0 ≡ peft, τ = ∞ ≡ base,
#              training), no host sync in a training step (torch.cuda.set_sync_debug_mode("error")), Trainer bf16,
#              greedy generation with a KV cache
#   sync       scripts/gpu_extras.py sync: where every host sync of a tiny Llama training step comes from
#              (forward+backward / optimizer / τ rule), set_sync_debug_mode("warn"), as a report
#   speed      benchmarks/speed.py --device cuda --quick on the synthetic grid (hidden 256-4096 × tokens 512-16384)
#   deepspeed  scripts/gpu_extras.py deepspeed: ZeRO-2 on one GPU (if the deepspeed wheel or package is there)
#   bnb-4bit   scripts/gpu_extras.py bnb4bit: TS-LoRA on a 4-bit bitsandbytes base (if bitsandbytes is there)
# Every step writes into the results folder; gpu_check.json there lists each step's exit status and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False): nothing to check" >&2
    exit 2
fi
NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-' | tr -s '-')
OUT_DIR="${RESULTS:-$ROOT/benchmarks/results}/gpu-${NAME%-}"
mkdir -p "$OUT_DIR"
STATUS="$OUT_DIR/steps.tsv"
: > "$STATUS"
echo "gpu_check: $NAME, results in $OUT_DIR"

DEADLINE=$(( START + ${BUDGET_S:-470} ))  # the whole script stays under 8 minutes: later steps get what is left
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to NAME.log, record status and seconds
    local name=$1 limit=$2 began=$(date +%s) rc
    shift 2
    (( limit > DEADLINE - began )) && limit=$(( DEADLINE - began ))
    if (( limit < 10 )); then
        printf '%s\t%s\t%s\n' "$name" "skipped: time budget spent" 0 >> "$STATUS"
        echo "== $name: skipped, the time budget is spent"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - began ))" >> "$STATUS"
    tail -n 5 "$OUT_DIR/$name.log"
    echo "== $name: exit $rc in $(( $(date +%s) - began ))s"
}

SITE=${GPU_SITE:-/tmp/tspeft-gpu-site}
step env 90 bash scripts/gpu_env.sh "$PY" "$SITE"
[ -d "$SITE" ] && export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH#"$ROOT/src"}"
"$PY" scripts/gpu_extras.py env-report > "$OUT_DIR/environment.json" 2>/dev/null

step cuda-tests 150 "$PY" -m pytest -m cuda tests/test_cuda.py -q -rA -p no:cacheprovider --junitxml="$OUT_DIR/cuda_tests.xml"
step sync 40 "$PY" scripts/gpu_extras.py sync --out "$OUT_DIR/sync.json"
step speed 120 "$PY" benchmarks/speed.py --device cuda --quick --skip-minilm --hidden 256 1024 4096 \
    --tokens 512 2048 16384 --train-budget 2 --inference-budget 1 --out "$OUT_DIR/speed.json"
step deepspeed 60 "$PY" scripts/gpu_extras.py deepspeed --out "$OUT_DIR/deepspeed_zero2.json"
step bnb-4bit 40 "$PY" scripts/gpu_extras.py bnb4bit --out "$OUT_DIR/bnb_4bit.json"

"$PY" scripts/gpu_extras.py summary --steps "$STATUS" --seconds "$(( $(date +%s) - START ))" \
    --out "$OUT_DIR/gpu_check.json"
echo "gpu_check: done in $(( $(date +%s) - START ))s; $OUT_DIR/gpu_check.json"
