# `r3rl train --compile` on probe-qwen3-moe in one process and under torchrun + FSDP2 (1 GPU): verdict, routing
# mismatch and update time per step with R3 + check; then AdamW fused against foreach with the real update profiled.
# RESULTS.md, "One training step".
. bench/gpu_env.sh
COMMON="--preset probe-qwen3-moe --device cuda --dtype bfloat16 --num-rollout ${STEPS:-4} --n-samples-per-prompt 8
  --rollout-batch-size 16 --rollout-max-response-len 128 --sft-steps 0 --lr 1e-5 --seed 1 --no-progress
  --eval-interval 0 --use-rollout-routing-replay --enable-r3-correctness-check --compile"
summary() {  # $1: metrics.jsonl
  python3 - "$1" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print(f"step {r['step']}: update {r['time/update']:.3f} s, old log-probs {r['time/old_logprobs']:.3f} s, "
          f"step {r['time/step']:.3f} s, routing_mismatch {r['routing_mismatch']}, check passed {r['r3_check_passed']}")
PY
}
timeout 240 python3 -m r3rl.cli train $COMMON --run-dir /tmp/runs/compile 2>$OUT/compile.log | grep -E '"verdict"'
summary /tmp/runs/compile/metrics.jsonl
# FSDP2 keeps fp32 master weights and Adam state: the probe's 5.1 B parameters need ~80 GB, more than an H100 has
# (it OOMed there); on an H100 this part runs the bench shape (PRESET_FSDP=bench-qwen3-moe)
timeout 240 torchrun --nproc-per-node 1 -m r3rl train ${COMMON/probe-qwen3-moe/${PRESET_FSDP:-probe-qwen3-moe}} \
  --release-rollout-memory --run-dir /tmp/runs/compile_fsdp 2>$OUT/compile_fsdp.log \
  | grep -E '"verdict"|world_size'
summary /tmp/runs/compile_fsdp/metrics.jsonl
grep -E "torch.compile:|Error" $OUT/compile_fsdp.log | head -3
# AdamW foreach vs fused: r3rl train's update with the real update profiled (two processes, one after the other)
for opt in foreach fused; do
  timeout 150 python3 bench/bench_train_step.py --preset probe-qwen3-moe --micro-batch-size 64 --compile --rounds 3 \
    --optimizer $opt --profile-update --out $OUT/ts_$opt.json 2>&1 \
    | grep -E '"(mfu_r3_check|mfu_train_update|update|optimizer)"' | head -8
done
