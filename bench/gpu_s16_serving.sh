# Session 16: decode graphs captured at server start (RolloutEngine.capture_decode_graphs, since renamed warmup) - its
# GPU test, then the
# serving benchmark again (the steps that admitted requests used to capture new batch buckets' graphs).
set -x
. bench/gpu_env.sh
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/rollout/engine/test_engine.py 2>&1 | tail -3
timeout 200 python3 bench/bench_serving.py --preset probe-qwen3-moe --max-slots 256 --out $OUT/serving.json 2>&1 \
  | grep -v " INFO " | tail -16
