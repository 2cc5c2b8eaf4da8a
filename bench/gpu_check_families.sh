# `r3rl check` in bf16 with the engine rollout on each new family's probe: routing mismatch and k3 KL without replay
# and with R3, the verdict. RESULTS.md, "`r3rl check` on the family probes".
set -x
. bench/gpu_env.sh
for p in probe-glm4-moe probe-gpt-oss probe-deepseek-v3 probe-minimax-m2; do
  timeout 100 python3 -m r3rl.cli check --preset $p --device cuda --dtype bfloat16 --use-rollout-routing-replay \
    --enable-r3-correctness-check --batch-size 8 --prompt-len 32 --response-len 32 --report $OUT/check_$p.json \
    2>&1 | grep -E "verdict|R3 check|mismatch tokens"
  python3 -c "import json; r=json.load(open('$OUT/check_$p.json')); print('$p', {k: r[k] for k in ('verdict',) if k in r}, r.get('without_replay'), r.get('with_replay'))"
done
