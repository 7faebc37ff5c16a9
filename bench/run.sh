#!/usr/bin/env bash
# Every bench, one after another, each under the machine's heavy-job lock (flock; one heavy job at a time on a shared
# 2-core box). Output of each in runs/bench/NAME.txt, its numbers in runs/bench/NAME.json. About 50 minutes on 2 cores.
# Usage: bash bench/run.sh [NAME ...]      PY=/work/venv-bench/bin/python bash bench/run.sh sft-fixed score
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-bench/bin/python}
LOCK=${LOCK:-/tmp/heavy.lock}
mkdir -p runs/bench
declare -A BENCH=(
  [sft-fixed]="bench/bench_sft.py"
  [sft-natural]="bench/bench_sft.py --lengths natural --skip-trl-default"
  [rm-speed-fixed]="bench/bench_rm_speed.py"
  [rm-speed-natural]="bench/bench_rm_speed.py --lengths natural --steps 7 --also-unchunked --skip-trl-default"
  [dpo-fixed]="bench/bench_dpo.py"
  [dpo-natural]="bench/bench_dpo.py --lengths natural --skip-trl-default"
  [score]="bench/bench_score.py"
  [sample]="bench/bench_sample.py"
  [memory]="bench/bench_memory.py"
  [scaling]="bench/bench_scaling.py"
)
ORDER=(sft-fixed sft-natural rm-speed-fixed rm-speed-natural dpo-fixed dpo-natural score sample memory scaling)
for name in "${@:-${ORDER[@]}}"; do
  [[ -n "${BENCH[$name]:-}" ]] || { echo "unknown bench $name (one of: ${ORDER[*]})"; exit 2; }
  echo "=== $name: $PY ${BENCH[$name]}"
  # shellcheck disable=SC2086
  flock "$LOCK" "$PY" ${BENCH[$name]} > "runs/bench/$name.txt" 2>&1 || { tail -n 30 "runs/bench/$name.txt"; exit 1; }
  sed -n '/^$/,$p' "runs/bench/$name.txt" | grep -v "^{'train" | tail -n 16
done
