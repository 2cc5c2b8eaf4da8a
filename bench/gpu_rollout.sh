# Rollout engine throughput against HF generate (bench_rollout.py): per preset, 9 interleaved rounds of the engine
# with routing capture on and off (decode-only timings for the capture cost), HF generate in the first 3 rounds on
# the same number of new tokens (128) at both batches; medians and ranges.
set -x
. bench/gpu_env.sh
for p in bench-qwen3-moe probe-qwen3-moe; do
  timeout 280 python3 bench/bench_rollout.py --presets $p --rounds 9 --hf-rounds 3 --out $OUT/rollout_$p.json 2>&1 \
    | grep -v " INFO "
done
