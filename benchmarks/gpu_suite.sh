#!/usr/bin/env bash
# The GPU suite: race, MFU, FSDP2, generation, each under its own timeout, one JSON line per measurement
# appended to $OUT/gpu_suite.jsonl (benchmarks/results/gpu_suite.jsonl when OUT is unset).
#
#   bash benchmarks/gpu_suite.sh                         # on one GPU, about 6-7 minutes
#   bash benchmarks/gpu_suite.sh --race-minutes 5        # the issue's 5 minutes per model (about 13 minutes)
#   bash benchmarks/gpu_suite.sh --smoke                 # the same code on the CPU, tiny preset, under a minute
#   bash benchmarks/gpu_suite.sh --set model.n_layers=12 --set train.lr=2e-3   # passed to every part
#
# BITLM_CORPUS names tinyshakespeare.txt (default: ../shared/data/tinyshakespeare.txt). PYTHON picks the
# interpreter (default: python3); it must already have torch and bitlm's dependencies: nothing is installed.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RACE_MINUTES=2
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --race-minutes) RACE_MINUTES=$2; shift 2 ;;
        --smoke) PASS+=(--smoke); shift ;;
        --set) PASS+=(--set "$2"); shift 2 ;;
        *) echo "gpu_suite.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
OUT_FILE=${OUT:-benchmarks/results}/gpu_suite.jsonl
mkdir -p "$(dirname "$OUT_FILE")"
# the checkout itself is the package: no `pip install -e .` needed, and no other torch gets pulled in
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import bitlm" 2>/dev/null; then
    echo "gpu_suite.sh: $PYTHON cannot import bitlm; install its dependencies (pip install -e . --no-deps" \
         "adds only bitlm, keeping the installed torch)" >&2
    exit 1
fi

# part NAME SECONDS ARGS...: one subcommand of bench_gpu.py; a failure or timeout becomes a line of its own
part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s)" >&2
    timeout --kill-after=15 "$limit" "$PYTHON" benchmarks/bench_gpu.py "$name" --out "$OUT_FILE" "${PASS[@]}" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        printf '{"bench": "gpu_suite_part_failed", "part": "%s", "rc": %d, "limit_s": %d, "date": "%s"}\n' \
            "$name" "$rc" "$limit" "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" | tee -a "$OUT_FILE"
    fi
}

# each limit is the part's budget plus start-up, compilation and evaluation
RACE_LIMIT=$(awk -v m="$RACE_MINUTES" 'BEGIN { printf "%d", 2 * m * 60 + 60 }')
part race "$RACE_LIMIT" --minutes "$RACE_MINUTES"
part mfu 120
part fsdp 45
part generation 45
echo "gpu_suite.sh: lines in $OUT_FILE" >&2
