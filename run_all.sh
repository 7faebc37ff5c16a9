#!/usr/bin/env bash
# The whole DPA loop on the embedded SmolLM2-135M-Instruct, offline, on CPU:
#   prepare → train_rm → ROUNDS × (sample → score → finetune) → evaluate every policy → steer example.
# Hardware: 2 CPU cores, ~10 GB RAM (peak 8.9 GiB measured); no GPU or network needed. Disk: ~0.6 GB per saved policy under runs/.
# Time (2 cores, bf16): 3,269 s (54 min) end to end on a quiet Intel Xeon with AVX-512 bf16 + AMX, 4,287 s on a slow
#   one (README), over the 30-minute budget;
#   SMOKE=1 168 s on 2 AVX2-only cores in fp32 (tiny sizes: proves the plumbing, not the method).
#   ABLATIONS=0 skips the evaluation of the best-of-3 reranking and of the RSF-only checkpoint.
# Usage: bash run_all.sh            RECIPE=paper bash run_all.sh            SMOKE=1 bash run_all.sh
#        PREF=rpo_paired OUT=runs/rpo bash run_all.sh     (the preference step after RSF: RPO instead of DPO)
# Interrupted (Ctrl-C, kill -9, power)? Run the same command again: finished stages are skipped, sampling and scoring
# continue from their OUT.partial logs, training from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
OUT=${OUT:-runs/demo}           # everything this run writes
MODEL=${MODEL:-embedded:SmolLM2-135M-Instruct}   # starting policy and RM backbone
SEED=${SEED:-0}
ROUNDS=${ROUNDS:-1}             # DPA iterations t = 1..ROUNDS
RECIPE=${RECIPE:-explore}       # explore: exploration hints and prefixes + hindsight RSF + neighbour DPO; paper: plain RSF
DPO_LR=${DPO_LR:-1.5e-5}        # peak learning rate of the DPO/RPO step (cosine decay to 10%)
CKPT_EVERY=${CKPT_EVERY:-25}    # training checkpoint every N steps (1.4 GB, ≈ 3 s each); a rerun resumes from it
TARGET_DEGREES=${TARGET_DEGREES:--45,-30,-15,0,15,30,45}   # hindsight RSF targets: the best answer at each angle
SFT_EPOCHS=${SFT_EPOCHS:-3}     # 1 epoch teaches the targets' mean, not the angle (README, Recipes); 0: no SFT,
                                # the preference step starts from the round's policy (its NLL term on the chosen is the SFT)
SFT_DECISION=${SFT_DECISION:-0}   # hindsight RSF: + this × the NLL of the decision tokens, where two angles' targets
                                # of one prompt part (finetune.py --decision-coef)
PAIRS=${PAIRS:-neighbours}      # DPO/RPO pairs: neighbours (order along θ) | mirrored (±a, the sign of the weight)
PAIR_DEGREES=${PAIR_DEGREES:--45,-15,15,45}   # neighbours: ascending angles; mirrored: a for pairs at ±a
DPO_EPOCHS=${DPO_EPOCHS:-1}
FREEZE_LAYERS=${FREEZE_LAYERS:-0}   # SFT and DPO/RPO leave the lowest N decoder layers frozen (15: 1.49x faster
                                # steps, but no dial with either RM; docs/recipes_switch.md)
PREF=${PREF:-dpo}               # explore recipe, preference step after hindsight RSF: dpo | rpo_paired | rpo_unpaired
                                # (Relative Preference Optimization, arXiv 2402.10958) | none (RSF only); same flags
case "$PREF" in dpo|rpo_paired|rpo_unpaired|none) ;; *) echo "error: PREF=$PREF (dpo|rpo_paired|rpo_unpaired|none)" >&2; exit 2;; esac
[[ "$SFT_EPOCHS" == 0 && "$PREF" == none ]] && { echo "error: SFT_EPOCHS=0 with PREF=none trains nothing" >&2; exit 2; }
EVAL_DEGREES=-45,-30,-15,0,15,30,45
STEER_DEGREES=-45,-15,15,45
RM_METHOD=${RM_METHOD:-regression}   # regression: the DPA RM, fine-tuned | probe: ArmoRM's ridge probe on frozen features
                                # (2 AVX2 cores: 320 s, Pearson 0.83 / 0.98, vs 1,176 s, 0.80 / 0.96)
case "$RM_METHOD" in regression|probe) ;; *) echo "error: RM_METHOD=$RM_METHOD (regression|probe)" >&2; exit 2;; esac
ABLATIONS=${ABLATIONS:-1}       # 1: also evaluate the best-of-n reranking of the base policy and the RSF-only checkpoint
if [[ "${SMOKE:-0}" == 1 ]]; then
  # tiny sizes: every stage runs once on the real model (the plumbing, not the method); the base and final
  # policies are evaluated, not the two ablations; the RM sees its first 60 ratings in batches of 4
  OUT=${OUT%/demo}/smoke; N_TRAIN=6; N_EVAL=3; N_SAMPLES=1; MAX_NEW=16; RM_STEPS=2; SFT_STEPS=1; DPO_STEPS=1
  RM_ROWS=60; RM_BATCH=4; SFT_BATCH=2; DPO_BATCH=2; ABLATIONS=0
  EVAL_DEGREES=-45,0,45; STEER_DEGREES=-45,45
else
  N_TRAIN=${N_TRAIN:-100}; N_EVAL=${N_EVAL:-24}; N_SAMPLES=${N_SAMPLES:-1}; MAX_NEW=${MAX_NEW:-160}
  RM_STEPS=${RM_STEPS:-0}; SFT_STEPS=${SFT_STEPS:-0}; DPO_STEPS=${DPO_STEPS:-0}   # 0 = the epochs below
  RM_ROWS=0; RM_BATCH=16; SFT_BATCH=8; DPO_BATCH=4
fi
mkdir -p "$OUT"
# a rerun resumes from what OUT holds, so one OUT serves one configuration: never mix policies of two
CONFIG="RECIPE=$RECIPE$([[ "$RECIPE" == paper ]] || echo " PREF=$PREF PAIRS=$PAIRS:$PAIR_DEGREES TARGETS=$TARGET_DEGREES SFT_EPOCHS=$SFT_EPOCHS$([[ "$SFT_DECISION" == 0 ]] || echo " SFT_DECISION=$SFT_DECISION") DPO_EPOCHS=$DPO_EPOCHS DPO_LR=$DPO_LR") FREEZE=$FREEZE_LAYERS RM=$RM_METHOD"
if [[ -f "$OUT/config.txt" && "$(cat "$OUT/config.txt")" != "$CONFIG" ]]; then
  echo "error: $OUT holds a run with $(cat "$OUT/config.txt"), not $CONFIG: choose another OUT" >&2; exit 2
fi
echo "$CONFIG" > "$OUT/config.txt"
t_start=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t_start ))s] $*"; }

# --- 0. the embedded model → a cached HF folder (once)
stamp prepare
$PY -m tools.prepare

# --- 1. multi-objective reward model on the demo ratings (data/rm_train.jsonl, labelled by judge.py)
stamp train_rm
case "$RM_METHOD" in  # the probe fits in one pass over frozen features: no steps, no checkpoints
  regression) RM_FLAGS=(--freeze-layers 16 --lr 1e-4 --epochs 1 --batch-size "$RM_BATCH" --max-steps "$RM_STEPS"
                        --save-every "$CKPT_EVERY" --resume) ;;
  probe) RM_FLAGS=(--method probe) ;;
esac
[[ -f "$OUT/rm/meta.json" ]] || $PY train_rm.py --data data/rm_train.jsonl --backbone "$MODEL" --out "$OUT/rm" \
  --limit "$RM_ROWS" --seed "$SEED" "${RM_FLAGS[@]}"

# evaluation of one policy: held-out prompts × every angle, scored by the RM and by the judge (ground truth)
evaluate_policy() {  # $1 policy folder, $2 name
  [[ -f "$OUT/eval-$2.jsonl" ]] && return
  [[ -f "$OUT/eval-$2.samples.jsonl" ]] || $PY sample.py --model "$1" --prompts data/prompts_heldout.jsonl \
    --limit "$N_EVAL" --degrees="$EVAL_DEGREES" --n 1 --temperature 0.7 --max-new-tokens "$MAX_NEW" --batch-size 112 \
    --seed 1234 --out "$OUT/eval-$2.samples.jsonl"
  $PY score.py --samples "$OUT/eval-$2.samples.jsonl" --rm "$OUT/rm" --judge --out "$OUT/eval-$2.jsonl"
}
stamp "evaluate round 0 (base policy)"
evaluate_policy "$MODEL" round0
EVALS="round0=$OUT/eval-round0.jsonl"
# inference-time DPA, no training: 3 × N_SAMPLES base-policy candidates per held-out prompt (plain/brief/detail
# hints), reranked per angle by vᵀr with the RM — the control that RSF tries to distil into the policy
BO="best-of-$((3 * N_SAMPLES))"
RERANK=""
if [[ "$ABLATIONS" == 1 ]]; then stamp "evaluate $BO reranking of the base policy"; RERANK="$BO=$OUT/eval-bo6.jsonl"; fi
if [[ "$ABLATIONS" == 1 && ! -f "$OUT/eval-bo6.jsonl" ]]; then
  [[ -f "$OUT/eval-bo6.samples.jsonl" ]] || $PY sample.py --model "$MODEL" --prompts data/prompts_heldout.jsonl \
    --limit "$N_EVAL" --n "$N_SAMPLES" --hints plain,brief,detail --temperature 0.7 --max-new-tokens "$MAX_NEW" \
    --batch-size 96 --seed 4321 --out "$OUT/eval-bo6.samples.jsonl"
  $PY score.py --samples "$OUT/eval-bo6.samples.jsonl" --rm "$OUT/rm" --judge --out "$OUT/eval-bo6.jsonl"
fi

policy="$MODEL"
for t in $(seq 1 "$ROUNDS"); do
  R="$OUT/round$t"
  mkdir -p "$R"
  final="$R/policy"                 # the round's policy; with PREF=none the RSF checkpoint itself
  [[ "$RECIPE" != paper && "$PREF" == none ]] && final="$R/sft"
  if [[ ! -f "$final/meta.json" ]]; then
    if [[ "$RECIPE" == paper ]]; then
      # --- 2-4 the paper's loop: one θ per prompt, n samples under it, best-of-n by vᵀr, SFT
      stamp "round $t: sample"
      [[ -f "$R/samples.jsonl" ]] || $PY sample.py --model "$policy" --prompts data/prompts_train.jsonl \
        --limit "$N_TRAIN" --n $((N_SAMPLES * 2)) --max-new-tokens "$MAX_NEW" --seed $((SEED + t)) \
        --out "$R/samples.jsonl"
      stamp "round $t: score"
      [[ -f "$R/scored.jsonl" ]] || $PY score.py --samples "$R/samples.jsonl" --rm "$OUT/rm" --out "$R/scored.jsonl"
      stamp "round $t: finetune (RSF)"
      $PY finetune.py --scored "$R/scored.jsonl" --init "$policy" --loss sft --select sampled --epochs 2 \
        --lr 3e-5 --max-steps "$SFT_STEPS" --freeze-layers "$FREEZE_LAYERS" --seed "$SEED" --out "$R/policy" \
        --save-every "$CKPT_EVERY" --resume
    else
      # --- 2. exploration: per prompt one random θ, samples under the plain DPA prompt and with brief/detail hints,
      #        each followed by its sentence-boundary prefixes: candidates of every length, all ending on a sentence
      stamp "round $t: sample"
      [[ -f "$R/samples.jsonl" ]] || $PY sample.py --model "$policy" --prompts data/prompts_train.jsonl --limit "$N_TRAIN" --n "$N_SAMPLES" \
        --hints plain,brief,detail --prefixes --max-new-tokens "$MAX_NEW" --batch-size 100 --seed $((SEED + t)) \
        --out "$R/samples.jsonl"
      # --- 3. multi-objective rewards of every sample
      stamp "round $t: score"
      [[ -f "$R/scored.jsonl" ]] || $PY score.py --samples "$R/samples.jsonl" --rm "$OUT/rm" --out "$R/scored.jsonl"
      # --- 4a. RSF with hindsight: best response per prompt for 7 angles from -45° to 45°, SFT under the plain DPA
      #         prompt of each angle (prints the targets' shape per θ first: the target diagnostic)
      [[ "$SFT_EPOCHS" == 0 ]] || stamp "round $t: finetune (hindsight RSF)"
      init="$R/sft"
      [[ "$SFT_EPOCHS" == 0 ]] && init="$policy"
      [[ "$SFT_EPOCHS" == 0 || -f "$R/sft/meta.json" ]] || $PY finetune.py --scored "$R/scored.jsonl" --init "$policy" --loss sft \
        --select hindsight --target-degrees="$TARGET_DEGREES" --epochs "$SFT_EPOCHS" --lr 5e-5 --batch-size "$SFT_BATCH" --max-steps "$SFT_STEPS" \
        --decision-coef "$SFT_DECISION" \
        --freeze-layers "$FREEZE_LAYERS" --seed "$SEED" --out "$R/sft" --save-every "$CKPT_EVERY" --resume
      # --- 4b. directional DPO (or RPO) between neighbouring angles (both pairs of a neighbour step in one batch),
      #         NLL term on the chosen
      if [[ "$PREF" != none ]]; then
        stamp "round $t: finetune ($PAIRS $PREF)"
        $PY finetune.py --scored "$R/scored.jsonl" --init "$init" --loss "$PREF" --pairs "$PAIRS" \
          --pair-degrees="$PAIR_DEGREES" --batch-size "$DPO_BATCH" --beta 0.1 --nll-coef 1.0 --epochs "$DPO_EPOCHS" --lr "$DPO_LR" \
          --max-steps "$DPO_STEPS" --freeze-layers "$FREEZE_LAYERS" --seed "$SEED" --out "$R/policy" \
          --save-every "$CKPT_EVERY" --resume
      fi
    fi
  fi
  if [[ "$ABLATIONS" == 1 && "$RECIPE" != paper && "$PREF" != none && "$SFT_EPOCHS" != 0 ]]; then   # the RSF checkpoint the preference step started from
    stamp "evaluate round $t (RSF only)"
    evaluate_policy "$R/sft" "round$t-rsf"
    EVALS="$EVALS round$t-rsf=$OUT/eval-round$t-rsf.jsonl"
  fi
  policy="$final"
  stamp "evaluate round $t"
  evaluate_policy "$policy" "round$t"
  EVALS="$EVALS round$t=$OUT/eval-round$t.jsonl"
done

# --- 5. the per-angle table for every round, Spearman(θ, verbosity), and the Pareto-front PNG
stamp evaluate
$PY evaluate.py $EVALS ${RERANK:+--rerank "$RERANK"} --degrees="$EVAL_DEGREES" --out "$OUT/eval" --overwrite

# --- 6. steering the final policy: the same question at both ends of the range
stamp steer
$PY steer.py --model "$policy" --degrees="$STEER_DEGREES" --max-new-tokens "$MAX_NEW" \
  "What should I pack for a weekend camping trip?"
stamp "done: results in $OUT (eval.csv, eval.png)"
