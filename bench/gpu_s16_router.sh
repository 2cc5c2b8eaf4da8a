# Session 16, the fused router kernel (r3rl.rollout.model.router_kernel): GPU tests, an eager-profile A/B (torch router vs
# fused router, same fused experts) on the bench shape at batch 32 and 256, then engine vs HF on both shapes.
set -x
. bench/gpu_env.sh
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $OUT/gpu_tests.txt 2>&1
grep -E "passed|failed|^FAILED|^E " $OUT/gpu_tests.txt | tail -15
for b in 32 256; do
  for r in "--torch-router" ""; do
    python3 bench/profile_decode.py --preset bench-qwen3-moe --batch $b --rows 22 $r 2>&1 | grep -v INFO \
      | cut -c1-72,150-175 | tail -27
  done
done
timeout 200 python3 bench/bench_rollout.py --presets probe-qwen3-moe bench-qwen3-moe --batches 32 256 --rounds 3 \
  --hf-rounds 1 --out $OUT/rollout.json 2>&1 | grep -v " INFO " | tail -12
