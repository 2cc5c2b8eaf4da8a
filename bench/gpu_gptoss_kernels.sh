# GPT-OSS's engine-vs-HF correctness gate and speed with each experts kernel (grouped_mm, fused) on probe-gpt-oss,
# batch 32, one round (`bench/bench_rollout.py --moe-kernel`). RESULTS.md, "GPT-OSS gate by kernel".
set -x
. bench/gpu_env.sh
for k in grouped_mm fused; do
  timeout 80 python3 bench/bench_rollout.py --presets probe-gpt-oss --batches 32 --rounds 1 --hf-rounds 1 \
    --moe-kernel $k --out $OUT/rollout_gptoss_$k.json 2>&1 | grep -v " INFO " | grep "gate\|^| probe"
done
