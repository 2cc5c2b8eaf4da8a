# Where a decode step goes now (eager kernel profile of probe-qwen3-moe at batch 32 and 256), and engine vs HF generate for the families whose HF decode ran out of memory before (HF kept on
# grouped_mm while decoding: --hf-experts grouped_mm) and MiniMax-M2.
set -x
. bench/gpu_env.sh
for b in 32 256; do
  timeout 60 python3 bench/profile_decode.py --preset probe-qwen3-moe --batch $b --rows 40 2>&1 | grep -v " INFO "
done
for p in probe-deepseek-v3 probe-glm4-moe probe-minimax-m2; do
  timeout 110 python3 bench/bench_rollout.py --presets $p --batches 32 256 --rounds 2 --hf-rounds 1 \
    --hf-experts grouped_mm --out $OUT/rollout_$p.json 2>&1 | grep -v " INFO " | grep "^|\|gate\|OOM\|Error"
done
