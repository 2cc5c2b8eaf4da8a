# Serving benchmark through `r3rl serve` on probe-qwen3-moe (bf16): concurrency 1, 32, 256 (prompt 64, 128 new
# tokens) and a GRPO-shaped load of 32 prompts x 8 samples with routes and log-probs returned. RESULTS.md, "Serving".
set -x
. bench/gpu_env.sh
timeout 540 python3 bench/bench_serving.py --preset probe-qwen3-moe --max-slots 256 --out $OUT/serving.json 2>&1 \
  | grep -v " INFO "
