# torchrun + FSDP2 `r3rl train` on probe-qwen3-moe (bf16 compute, fp32 master weights, R3 + check): per-rank
# evidence and the verdict, update tokens/s on 1 GPU without FSDP, and on 1 (and 2, 4 when the host has them) GPUs
# with FSDP2 at the same per-GPU batch (no checkpoint: a 5 B model's fp32 + Adam state exceeds the disk).
# RESULTS.md, "torchrun + FSDP2 training". (The weight-sync benchmark that ran at its end is gpu_weight_sync.sh.)
set -x
. bench/gpu_env.sh
NGPU=$(nvidia-smi -L | wc -l)
PER_GPU_PROMPTS=${PER_GPU_PROMPTS:-16}
COMMON="--preset probe-qwen3-moe --device cuda --dtype bfloat16 --num-rollout ${STEPS:-4} --n-samples-per-prompt 8
  --rollout-max-response-len 128 --sft-steps 0 --lr 1e-5 --micro-batch-size 32 --seed 1 --no-progress
  --eval-interval 0 --use-rollout-routing-replay --enable-r3-correctness-check"
python3 -m r3rl.cli train $COMMON --rollout-batch-size $PER_GPU_PROMPTS --run-dir /tmp/runs/plain \
  2>$OUT/plain.log | grep -E '"verdict"|"error"'
cp /tmp/runs/plain/metrics.jsonl $OUT/metrics_plain.jsonl
for N in 1 2 4; do
  [ "$N" -le "$NGPU" ] || continue
  torchrun --nproc-per-node $N -m r3rl train $COMMON --rollout-batch-size $((PER_GPU_PROMPTS * N)) \
    --release-rollout-memory --run-dir /tmp/runs/fsdp$N 2>$OUT/fsdp$N.log | grep -E '"verdict"|"error"|world_size'
  cp /tmp/runs/fsdp$N/metrics.jsonl $OUT/metrics_fsdp$N.jsonl
  python3 -m r3rl.cli verify-logs $OUT/fsdp$N.log | grep -E '"verdict"'
  tail -3 $OUT/fsdp$N.log
done
python3 - <<'PY'
import json, os, statistics
out = os.environ["OUT"]
for name in ["plain", "fsdp1", "fsdp2", "fsdp4"]:
    p = f"{out}/metrics_{name}.jsonl"
    if not os.path.exists(p):
        continue
    rows = [json.loads(l) for l in open(p)][1:]  # step 0 includes CUDA graph capture and allocator warm-up
    tps = [r["update_tokens_per_s"] for r in rows]
    print(f"{name}: update tokens/s median {statistics.median(tps):.0f} (range {min(tps):.0f}-{max(tps):.0f}), "
          f"step s {statistics.median([r['time/step'] for r in rows]):.2f}, rollout s "
          f"{statistics.median([r['time/rollout'] for r in rows]):.2f}, update s "
          f"{statistics.median([r['time/update'] for r in rows]):.2f}, r3 mismatch {sum(r['r3_check_mismatch'] for r in rows)}")
PY
