#!/usr/bin/env bash
# Every bench, one after another, each under the machine's heavy-job lock (flock; one heavy job at a time on a shared
# 2-core box). Output of each in runs/bench/NAME.txt, its numbers in runs/bench/NAME.json. About 45 minutes of
# machine time on 2 cores. A failing bench is reported and the next one runs; the exit status is 1 if any failed.
# Usage: bash bench/run.sh [NAME ...]      PY=/work/venv-bench/bin/python bash bench/run.sh sft-fixed score
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-bench/bin/python}
LOCK=${LOCK:-/tmp/heavy.lock}
mkdir -p runs/bench
declare -A BENCH=(
  [sft-fixed]="bench/bench_sft.py --steps 2 --skip-trl-default"
  [sft-natural]="bench/bench_sft.py --lengths natural --steps 2 --skip-trl-default"
  [rm-speed-fixed]="bench/bench_rm_speed.py --steps 2 --also-chunked 4 --skip-trl-default"
  [rm-speed-natural]="bench/bench_rm_speed.py --lengths natural --steps 2 --also-chunked 4 --skip-trl-default"
  [dpo-fixed]="bench/bench_dpo.py --steps 2 --skip-trl-default"
  [dpo-natural]="bench/bench_dpo.py --lengths natural --steps 2 --skip-trl-default"
  [score]="bench/bench_score.py --n 96"
  [sample]="bench/bench_sample.py"
  [memory]="bench/bench_memory.py"
  [scaling]="bench/bench_scaling.py"
)
ORDER=(sft-fixed rm-speed-natural dpo-fixed score sample memory scaling rm-speed-fixed sft-natural dpo-natural)
failed=0
for name in "${@:-${ORDER[@]}}"; do
  [[ -n "${BENCH[$name]:-}" ]] || { echo "unknown bench $name (one of: ${ORDER[*]})"; exit 2; }
  echo "=== $name: $PY ${BENCH[$name]}"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  if flock "$LOCK" "$PY" ${BENCH[$name]} > "runs/bench/$name.txt" 2>&1; then
    sed -n '/^$/,$p' "runs/bench/$name.txt" | grep -v "^{'train" | tail -n 24
  else
    tail -n 30 "runs/bench/$name.txt"; failed=1
  fi
  echo "=== $name: $(( $(date +%s) - t0 )) s (lock wait included)"
done
exit $failed
