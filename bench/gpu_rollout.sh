# Engine vs HF `generate` on probe-qwen3-moe and bench-qwen3-moe (`bench/bench_rollout.py`): per (preset, batch),
# 5 interleaved rounds of the engine with routing capture on and off, HF `generate` in 2 of them on the same 128 new
# tokens, batch 32 and 256; medians and ranges, % of the bandwidth floor, the correctness gate.
# RESULTS.md, "Engine vs HF generate".
set -x
. bench/gpu_env.sh
timeout 300 python3 bench/bench_rollout.py --presets probe-qwen3-moe bench-qwen3-moe --batches 32 256 --rounds 5 \
  --hf-rounds 2 --out $OUT/rollout.json 2>&1 | grep -v " INFO " | tail -12
