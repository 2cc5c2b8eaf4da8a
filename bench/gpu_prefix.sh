# GRPO group prefill (`bench/bench_prefix.py`, probe-qwen3-moe, prompt 1,024, n = 8, `generate` with 1 new token):
# one sample vs a group sharing the prompt vs n distinct prompts. RESULTS.md, "GRPO group prefill".
set -x
. bench/gpu_env.sh
timeout 90 python3 bench/bench_prefix.py --preset probe-qwen3-moe --prompt-len 1024 --n 8 --out $OUT/prefix.json \
  2>&1 | grep -v " INFO " | tail -6
