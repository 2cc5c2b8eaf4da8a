# Fused MoE Triton kernels: the GPU tests (bf16 vs the grouped_mm path, CUDA-graph replay; torch and Triton
# alignment), the one-layer micro-benchmark at the probe shape (hidden 2048, 128 experts, top-8, I 768; 32 and 256
# decode tokens) with a tile sweep, then end-to-end engine decode with the fused kernels put into the MoE block.
set -x
. bench/gpu_env.sh
python3 -c "import triton; print('triton', triton.__version__)"
timeout 60 python3 -m pytest -q -m gpu tests/rollout/model/test_fused_moe.py -p no:cacheprovider 2>&1 | tee $OUT/pytest_gpu.log | tail -3
timeout 70 python3 bench/bench_fused_moe.py --sweep --out $OUT/fused_moe.json 2>&1 | grep -v Warning
cd bench && timeout 150 python3 bench_fused_engine.py --out $OUT/fused_engine.json 2>&1 | grep -v " INFO r3rl"
