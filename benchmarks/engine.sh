#!/usr/bin/env bash
# The engine benchmarks quoted in docs/benchmarks.md. Run from the repository root.
#   benchmarks/engine.sh          CPU figures on the demo checkpoint
#   (the GPU figures: benchmarks/gpu.sh)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap"
hidream="$root/.venv/bin/hidream"
model="${HIDREAM_BENCH_MODEL:-$(mktemp -d)/demo-model}"
[ -f "$model/config.json" ] || "$hidream" demo-model "$model" >/dev/null
"$hidream" bench --model "$model" --device cpu --size 512x512 --steps 20
"$hidream" bench --model "$model" --device cpu --size 1024x1024 --steps 10
"$hidream" bench --model "$model" --device cpu --size 512x512 --steps 10 --refs 2
"$hidream" bench --model "$model" --device cpu --size 512x512 --steps 10 --refs 10
