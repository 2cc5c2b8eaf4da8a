# Paged decode attention read in place (Triton) instead of gathered: its GPU tests (kernel vs gather path inside the
# engine, bf16; paging under CUDA graphs; engine vs HF), then the engine vs HF on probe-qwen3-moe at batch 32/256.
set -x
. bench/gpu_env.sh
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/rollout/model/test_paged_attention.py \
  tests/rollout/engine/test_paging.py tests/rollout/engine/test_engine.py tests/rollout/engine/test_engine_families.py 2>&1 | tail -6
timeout 170 python3 bench/bench_rollout.py --presets probe-qwen3-moe --batches 32 256 --rounds 5 --hf-rounds 1 \
  --out $OUT/rollout_probe_paged_kernel.json 2>&1 | grep -v " INFO "
