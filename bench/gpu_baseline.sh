# Re-measure the engine after the bf16 rounding changes (RoPE in three rounded ops, weighted sum over k, bias after
# the product): probe-qwen3-moe throughput + gate, probe-gpt-oss throughput + gate (its bf16 drift fix), then the
# serving benchmark through `r3rl serve` (concurrency 1/32/256 and the GRPO-shaped load).
set -x
. bench/gpu_env.sh
timeout 200 python3 bench/bench_rollout.py --presets probe-qwen3-moe --batches 32 256 --rounds 5 --hf-rounds 2 \
  --out $OUT/rollout_probe.json 2>&1 | grep -v " INFO "
timeout 150 python3 bench/bench_rollout.py --presets probe-gpt-oss --batches 32 256 --rounds 3 --hf-rounds 1 \
  --hf-cap-batch 256 --hf-cap-tokens 16 --out $OUT/rollout_gpt_oss.json 2>&1 | grep -v " INFO "
timeout 200 python3 bench/bench_serving.py --preset probe-qwen3-moe --max-slots 256 --out $OUT/serving.json 2>&1 \
  | grep -v " INFO "
