#!/usr/bin/env bash
# Reruns every recorded benchmark with the command its record in benchmarks/results/<name>.json was made with,
# sequentially, and prints the elapsed time of each.
#
# Usage: benchmarks/run_all.sh [name ...]     (default: all, in the order below; names as in the list)
#        DATA_PATH=/path/to/data benchmarks/run_all.sh     (default ../shared/data, as recorded)
#
# Results go to benchmarks/results/ (<name>.json with command, date, scale and commit; <name>.md; plots); training
# checkpoints to ~/.cache/learned_inference/bench, so an interrupted run resumes and trained models are reused.
# Run on a quiet machine: the timings in the records are wall-clock. From scratch the full list takes many hours
# on 2 CPU cores (mixture_comparison and rme_barrier_selection alone several; see their docstrings).
set -euo pipefail
cd "$(dirname "$0")/.."
data=(--data-path "${DATA_PATH:-../shared/data}")

run() {  # run <name> <command...>: the command, unless names were given and <name> is not one of them
    local name=$1 start
    shift
    if (( ${#selected[@]} )) && [[ ! " ${selected[*]} " == *" ${name} "* ]]; then
        return
    fi
    start=$(date +%s)
    "$@"
    echo "== ${name}: $(( $(date +%s) - start )) s"
}

demo() {  # the CLI demo, recorded as demo.json / demo.md / demo_*.png with the provenance of a benchmark record
    local report
    report=$(mktemp -d)
    learned-inference demo --quiet --report "${report}"
    for plot in elbo_over_steps learning_curves reconstructions; do
        cp "${report}/${plot}.png" "benchmarks/results/demo_${plot}.png"
    done
    sed -E 's/\]\(([a-z_]+\.png)\)/](demo_\1)/' "${report}/report.md" > benchmarks/results/demo.md
    python - "${report}/results.json" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
import common
record = json.load(open(sys.argv[1]))
record.update({"scale": "full", **common.provenance()})
open("benchmarks/results/demo.json", "w").write(json.dumps(record, indent=2) + "\n")
EOF
}

selected=("$@")
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
total_start=$(date +%s)
run demo demo
run memory python benchmarks/memory.py
run estimator_memory python benchmarks/estimator_memory.py
run compile python benchmarks/compile.py --batches 32 256 2048 --modes train infer --repeats 9 --warmup 3 \
    --threads 1 --out benchmarks/results/compile.json
run overhead python benchmarks/overhead.py "${data[@]}" --quiet
run training_comparison python benchmarks/training_comparison.py "${data[@]}" --quiet
run inference_comparison python benchmarks/inference_comparison.py "${data[@]}" --quiet
run figures python benchmarks/figures.py --scale full --threads 2 "${data[@]}" --quiet
run frozen_refinement python benchmarks/frozen_refinement.py "${data[@]}" --quiet
run frozen_refinement_fashion_mnist python benchmarks/frozen_refinement.py "${data[@]}" --quiet \
    --dataset fashion-mnist
run hierarchical_comparison python benchmarks/hierarchical_comparison.py "${data[@]}"
run text_perplexity python benchmarks/text_perplexity.py --threads 1 "${data[@]}"
run pyro_vae python benchmarks/pyro_vae.py --epochs 5 --train 5000 --test 1000 --batch 100 --lr 0.001 --steps 5 \
    --seed 0 --threads 1
run pyro_examples python benchmarks/pyro_examples.py --threads 1   # needs a Pyro checkout: --pyro-examples
run pyro_autoguide_suite python benchmarks/pyro_autoguide_suite.py --threads 1   # needs Pyro's git: --pyro-repo
run mixture_posterior_2d python benchmarks/mixture_posterior_2d.py --threads 1 --quiet
run rme_barrier python benchmarks/rme_barrier.py --threads 1
# C is chosen on held-out images first; mixture_comparison then runs with the chosen C (0.3 on both datasets)
run rme_barrier_selection python benchmarks/rme_barrier_selection.py --threads 1 --quiet "${data[@]}" \
    --datasets binarized_mnist fashion_mnist --barriers 0.3 1 --barriers 0.1 0.3 1 3
run mixture_comparison python benchmarks/mixture_comparison.py --threads 2 --quiet "${data[@]}" --rme-barrier 0.3
run gap_report python benchmarks/gap_report.py --threads 1 "${data[@]}" --quiet
echo "== total: $(( $(date +%s) - total_start )) s"
