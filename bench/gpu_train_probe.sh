# `r3rl train` on probe-qwen3-moe (bf16, engine rollout): R3, R2 and no replay for the same steps and seeds, per-step
# routing mismatch, |Δlogp| and k3 KL. RESULTS.md, "`r3rl train` on the probe". (The one-step benchmark that ran at
# the end of this recipe is gpu_train_step.sh.)
set -x
. bench/gpu_env.sh
COMMON="--preset probe-qwen3-moe --device cuda --dtype bfloat16 --num-rollout ${STEPS:-8} --rollout-batch-size 16
  --n-samples-per-prompt 8 --rollout-max-response-len 128 --sft-steps 20 --sft-lr 5e-4 --lr 1e-5 --micro-batch-size 32 --seed 1 --no-progress"
python3 -m r3rl.cli train $COMMON --use-rollout-routing-replay --enable-r3-correctness-check --run-dir /tmp/runs/r3 \
  2>$OUT/r3.log | grep -E '"verdict"|"error"'
python3 -m r3rl.cli train $COMMON --use-routing-replay --enable-r3-correctness-check --run-dir /tmp/runs/r2 \
  2>$OUT/r2.log | grep -E '"verdict"|"error"'
python3 -m r3rl.cli train $COMMON --run-dir /tmp/runs/none 2>$OUT/none.log | grep -E '"verdict"|"error"'
python3 -m r3rl.cli verify-logs $OUT/r3.log | grep -E '"verdict"'
for m in r3 r2 none; do cp /tmp/runs/$m/metrics.jsonl $OUT/metrics_$m.jsonl; done
