# Engine vs HF `generate` on the other families' probes: GPT-OSS (its HF default path; 2 rounds, HF in 1), then
# DeepSeek-V3, GLM-4.5 and MiniMax-M2 with HF kept on grouped_mm while decoding (`--hf-experts grouped_mm`: HF's
# default decode path runs out of memory on the 256-expert models). RESULTS.md, "Engine vs HF: the other families".
set -x
. bench/gpu_env.sh
timeout 80 python3 bench/bench_rollout.py --presets probe-gpt-oss --batches 32 --rounds 2 --hf-rounds 1 \
  --out $OUT/rollout_probe-gpt-oss.json 2>&1 | grep -v " INFO " | grep "gate\|^| probe"
for p in probe-deepseek-v3 probe-glm4-moe probe-minimax-m2; do
  timeout 110 python3 bench/bench_rollout.py --presets $p --batches 32 256 --rounds 2 --hf-rounds 1 \
    --hf-experts grouped_mm --out $OUT/rollout_$p.json 2>&1 | grep -v " INFO " | grep "^|\|gate\|OOM\|Error"
done
