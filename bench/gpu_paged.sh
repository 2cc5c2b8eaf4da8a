# Paged KV cache with shared group prompts (issue 10, item 2) and the serving GIL fix: the GPU tests (paging under CUDA
# graphs with preemption; engine, families and fused kernels), the GRPO-group prefill benchmark (prompt 1024, n 8),
# the engine vs HF at batch 32/256 (decode now gathers each row's KV blocks), and the serving benchmark.
set -x
. bench/gpu_env.sh
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/rollout/engine/test_paging.py tests/rollout/engine/test_engine.py \
  tests/rollout/engine/test_engine_families.py tests/rollout/model/test_fused_moe.py 2>&1 | tail -6
timeout 90 python3 bench/bench_prefix.py --preset probe-qwen3-moe --prompt-len 1024 --n 8 --rounds 5 \
  --out $OUT/prefix.json 2>&1 | grep -v " INFO "
timeout 170 python3 bench/bench_rollout.py --presets probe-qwen3-moe --batches 32 256 --rounds 5 --hf-rounds 1 \
  --out $OUT/rollout_probe_paged.json 2>&1 | grep -v " INFO "
timeout 150 python3 bench/bench_serving.py --preset probe-qwen3-moe --max-slots 256 --out $OUT/serving.json 2>&1 \
  | grep -v " INFO \|Writing model"
