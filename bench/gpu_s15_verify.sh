# Session 15, first run: the GPU tests not yet run on a GPU (fused GPT-OSS experts, rewritten paged-attention test,
# Qwen3-Next engine under CUDA graphs), an eager decode profile (top kernels) of probe-qwen3-moe at 32/256, the bench
# shape with the fused default, and GPT-OSS at batch 32 with its fused experts.
set -x
. bench/gpu_env.sh
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -15 > $OUT/gpu_tests.txt
tail -15 $OUT/gpu_tests.txt
for b in 32 256; do
  timeout 60 python3 bench/profile_decode.py --preset probe-qwen3-moe --batch $b --rows 60 2>&1 | grep -v " INFO " > $OUT/profile_b$b.txt
  tail -3 $OUT/profile_b$b.txt
done
timeout 150 python3 bench/bench_rollout.py --presets bench-qwen3-moe --batches 32 256 --rounds 3 --hf-rounds 1 \
  --out $OUT/rollout_bench.json 2>&1 | grep -v " INFO " | tail -20
timeout 90 python3 bench/bench_rollout.py --presets probe-gpt-oss --batches 32 --rounds 2 --hf-rounds 1 \
  --out $OUT/rollout_gptoss.json 2>&1 | grep -v " INFO " | tail -12
