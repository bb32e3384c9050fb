#!/usr/bin/env bash
# Runs the full benchmark suite sequentially with 2 threads and prints the elapsed time of each benchmark.
# Usage: benchmarks/run_all.sh [extra options for every script, e.g. --data-path ../shared/data]
# Results go to benchmarks/results/ (<name>.json, <name>.md, plots); training checkpoints to
# ~/.cache/learned_inference/bench (an interrupted run resumes from them). Run on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
total_start=$(date +%s)
for name in inference_comparison training_comparison hierarchical_comparison text_perplexity overhead figures; do
    start=$(date +%s)
    python "benchmarks/${name}.py" --scale full --threads 2 "$@"
    echo "== ${name}: $(( $(date +%s) - start )) s"
done
echo "== total: $(( $(date +%s) - total_start )) s"
