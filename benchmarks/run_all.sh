#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, in sequence (they share 2 cores; never run two at once).
# Usage: bash benchmarks/run_all.sh [results-dir]   (about 35 minutes on a 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
OUT=${1:-results}
mkdir -p "$OUT"
$PY bench_codec.py --out "$OUT/codec.jsonl"
$PY bench_throughput.py --out "$OUT/throughput.jsonl"
$PY bench_kv_cache.py --out "$OUT/kv_cache.jsonl"
$PY bench_memory.py --out "$OUT/memory.jsonl"
$PY bench_generation.py --out "$OUT/generation.jsonl"
$PY bench_gate.py --out "$OUT/gate.jsonl"
$PY bench_rle.py --out "$OUT/rle.jsonl"
$PY bench_quality.py --minutes 10 --out "$OUT/quality.jsonl" --curves "$OUT/quality_curves.json"
$PY bench_diffusion.py --minutes 10 --out "$OUT/diffusion.jsonl" --save "$OUT/diffusion-model"
