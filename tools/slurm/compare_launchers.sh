#!/usr/bin/env bash
# Wall time of a grid through the local launcher and through Slurm (a cluster must answer:
# `tools/slurm/cluster.sh start`, then export SLURM_CONF), each from an empty output root,
# and whether every run file of the two is byte-identical. Prints a Markdown table.
#   tools/slurm/compare_launchers.sh [GRID] [EDPO]
set -euo pipefail
grid=${1:-experiments/smoke.yaml}
edpo=${2:-target/debug/edpo}
[ -x "$edpo" ] || { echo "no $edpo: cargo build -p edpo" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
name=$("$edpo" sweep "$grid" --dry-run | tail -1 | sed 's|.*/||')
cpus=$(nproc)

t0=$(date +%s.%N)
"$edpo" sweep "$grid" --out "$work/local" --report-out "$work/report" --jobs "$cpus" >/dev/null
t1=$(date +%s.%N)
"$edpo" sweep "$grid" --out "$work/slurm" --launcher slurm --max-parallel "$cpus" >/dev/null
while "$edpo" sweep status "$work/slurm/$name" | tail -1 | grep -qv "0 running, 0 pending"; do sleep 0.2; done
t2=$(date +%s.%N)

same=yes
for d in "$work/local/$name/runs"/*/; do
    h=$(basename "$d")
    for f in config.yaml metrics.jsonl eval.json per_prompt.jsonl decisions.json; do
        if [ -e "$d/$f" ] || [ -e "$work/slurm/$name/runs/$h/$f" ]; then
            cmp -s "$d/$f" "$work/slurm/$name/runs/$h/$f" || same=no
        fi
    done
done
runs=$(ls "$work/local/$name/runs" | wc -l)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
echo "| launcher | runs | wall s (from an empty cache) |"
echo "|---|---|---|"
printf '| local (--jobs %s) | %s | %.1f |\n' "$cpus" "$runs" "$(awk "BEGIN { print $t1 - $t0 }")"
printf '| slurm (--max-parallel %s, stages on the login node) | %s | %.1f |\n' "$cpus" "$runs" "$(awk "BEGIN { print $t2 - $t1 }")"
echo
echo "$grid on $cpu, $cpus cores; run files byte-identical: $same"
