# `r3rl check` on probe-qwen3-moe: engine rollout with each fault (the shift and permute controls must fail), then the
# HF KV-cache rollout. RESULTS.md, "`r3rl check` on the probe".
set -x
. bench/gpu_env.sh
for f in none shift permute-layers; do
  python3 -m r3rl.cli check --preset probe-qwen3-moe --device cuda --batch-size 32 --prompt-len 64 --response-len 128 \
    --use-rollout-routing-replay --enable-r3-correctness-check --inject-fault $f --report $OUT/check_engine_$f.json \
    2>$OUT/check_engine_$f.log | grep -E '"verdict"|"reason"'
done
python3 -m r3rl.cli check --preset probe-qwen3-moe --rollout hf --device cuda --batch-size 32 --prompt-len 64 \
  --response-len 128 --use-rollout-routing-replay --enable-r3-correctness-check --report $OUT/check_hf_none.json \
  2>/dev/null | grep -E '"verdict"'
