# Session 16, after the fused router, the fused sum-over-k + residual and the overlap schedule.
# A: GPU tests, engine vs HF on both shapes (5 interleaved rounds, HF in 2), wall time per decode step.
# B: GPT-OSS's gate and speed (top-k-softmax router in the kernel), the GRPO-group prefill, the serving benchmark.
set -x
. bench/gpu_env.sh
if [ "$1" = A ]; then
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $OUT/gpu_tests.txt 2>&1
  grep -E "passed|failed|^FAILED|^E " $OUT/gpu_tests.txt | tail -15
  timeout 300 python3 bench/bench_rollout.py --presets probe-qwen3-moe bench-qwen3-moe --batches 32 256 --rounds 5 \
    --hf-rounds 2 --out $OUT/rollout.json 2>&1 | grep -v " INFO " | tail -12
fi
if [ "$1" = B ]; then
  timeout 80 python3 bench/bench_rollout.py --presets probe-gpt-oss --batches 32 --rounds 2 --hf-rounds 1 \
    --out $OUT/rollout_gptoss.json 2>&1 | grep -v " INFO " | grep "gate\|^| probe"
  timeout 60 python3 bench/bench_prefix.py 2>&1 | grep -v " INFO " | tail -6
  for b in 32 256; do
    timeout 60 python3 bench/profile_host.py --preset bench-qwen3-moe --batch $b --rows 12 2>&1 | grep -v INFO | head -22
  done
  timeout 170 python3 bench/bench_serving.py --preset probe-qwen3-moe --max-slots 256 --out $OUT/serving.json 2>&1 \
    | grep -v " INFO " | tail -16
fi
