# Session 15, final run: GPU tests (GPT-OSS's fused-vs-HF-rounding numbers printed), engine vs HF on the probe and
# bench shapes (5 rounds, HF in 2), GPT-OSS with the auto kernel choice (grouped_mm), the GRPO-group prefill and the
# serving benchmark with the asyncio client (concurrency 1/32/256, RL 32 x 8).
set -x
. bench/gpu_env.sh
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $OUT/gpu_tests.txt 2>&1
grep -E "passed|failed|^FAILED|^E " $OUT/gpu_tests.txt | tail -12
timeout 60 python3 -m pytest -q -s -p no:cacheprovider tests/rollout/model/test_fused_moe.py -k "gpt_oss_bf16_on_gpu" 2>&1 | grep -E "fused|passed|failed|^E " | tail -8
timeout 230 python3 bench/bench_rollout.py --presets probe-qwen3-moe bench-qwen3-moe --batches 32 256 --rounds 5 \
  --hf-rounds 2 --out $OUT/rollout.json 2>&1 | grep -v " INFO " | tail -12
timeout 70 python3 bench/bench_rollout.py --presets probe-gpt-oss --batches 32 --rounds 2 --hf-rounds 1 \
  --out $OUT/rollout_gptoss.json 2>&1 | grep -v " INFO " | grep "gate\|^| probe"
timeout 60 python3 bench/bench_prefix.py 2>&1 | grep -v " INFO " | tail -6
timeout 150 python3 bench/bench_serving.py --preset probe-qwen3-moe --max-slots 256 --out $OUT/serving.json 2>&1 \
  | grep -v " INFO " | tail -16
