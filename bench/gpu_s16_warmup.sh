# Session 16: RolloutEngine.warmup (decode graphs of every bucket + the fused MoE kernels of every prefill tier, at
# server start; kernels no longer rebuilt per token count) - its GPU test, then the serving benchmark again.
set -x
. bench/gpu_env.sh
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/rollout/engine/test_engine.py tests/rollout/model/test_router_kernel.py \
  tests/rollout/model/test_fused_moe.py 2>&1 | grep -E "passed|failed|^E " | tail -6
timeout 200 python3 bench/bench_serving.py --preset probe-qwen3-moe --max-slots 256 --out $OUT/serving.json 2>&1 \
  | grep -v " INFO " | tail -16
