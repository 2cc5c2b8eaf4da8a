# Session 15: which change moved GPT-OSS's engine-vs-HF gate (0.030 -> 0.117): its gate with the gathered decode
# attention (sinks keep the torch path now), with grouped_mm experts and with the fused kernels forced.
set -x
. bench/gpu_env.sh
for k in grouped_mm fused; do
  timeout 80 python3 bench/bench_rollout.py --presets probe-gpt-oss --batches 32 --rounds 1 --hf-rounds 1 \
    --moe-kernel $k --out $OUT/rollout_gptoss_$k.json 2>&1 | grep -v " INFO " | grep "gate\|^| probe"
done
