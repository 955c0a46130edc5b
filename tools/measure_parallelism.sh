#!/usr/bin/env bash
# Wall time of a sweep with --jobs 1 vs 2 (1 thread per run), as the grid is and with runs of
# about a second, and of one run with 1 vs 2 threads, on the synthetic ε-ablation grid. Stages
# are built once beforehand and excluded; reports go to the temporary directory.
# Usage: tools/measure_parallelism.sh [path to edpo binary]
set -euo pipefail
cd "$(dirname "$0")/.."
EDPO=${1:-target/debug/edpo}
OUT=$(mktemp -d)
GRID=experiments/synthetic-ablation.yaml
"$EDPO" train experiments/synthetic.yaml --out "$OUT" >/dev/null 2>&1   # builds the stages
time_of() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
runs=$("$EDPO" sweep "$GRID" --dry-run | tail -n 1 | cut -d' ' -f1)
j1=$(time_of "$EDPO" sweep "$GRID" --jobs 1 --threads 1 --out "$OUT" --report-out "$OUT/report")
rm -rf "$OUT/synthetic-ablation"
j2=$(time_of "$EDPO" sweep "$GRID" --jobs 2 --threads 1 --out "$OUT" --report-out "$OUT/report")
BIG="--set task.train_pairs=512 --set model.n_embd=128 --set model.n_layer=4 --set model.n_head=4"
# The same grid with runs of about a second (the larger model, one epoch).
LONG="$BIG --set optim.epochs=1"
"$EDPO" sweep "$GRID" $LONG --jobs 2 --threads 1 --out "$OUT" --report-out "$OUT/report" >/dev/null 2>&1  # stages
rm -rf "$OUT/synthetic-ablation"
l1=$(time_of "$EDPO" sweep "$GRID" $LONG --jobs 1 --threads 1 --out "$OUT" --report-out "$OUT/report")
rm -rf "$OUT/synthetic-ablation"
l2=$(time_of "$EDPO" sweep "$GRID" $LONG --jobs 2 --threads 1 --out "$OUT" --report-out "$OUT/report")
"$EDPO" train experiments/synthetic.yaml $BIG --out "$OUT" --set run.threads=1 >/dev/null 2>&1  # stages
rm -rf "$OUT"/synthetic-*
t1=$(time_of "$EDPO" train experiments/synthetic.yaml $BIG --out "$OUT" --set run.threads=1)
rm -rf "$OUT"/synthetic-*
t2=$(time_of "$EDPO" train experiments/synthetic.yaml $BIG --out "$OUT" --set run.threads=2)
printf '| what | 1 | 2 |\n|---|---|---|\n'
printf '| sweep of %s runs (%s), wall s, by --jobs | %.1f | %.1f |\n' "$runs" "$GRID" "$j1" "$j2"
printf '| the same, width 128, 4 layers, 512 pairs, one epoch, wall s, by --jobs | %.1f | %.1f |\n' "$l1" "$l2"
printf '| one run (width 128, 4 layers, 512 pairs), wall s, by run.threads | %.1f | %.1f |\n' "$t1" "$t2"
rm -rf "$OUT"
