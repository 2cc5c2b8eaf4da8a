# One MoE layer's experts at the probe shape (hidden 2048, 128 experts, top-8, I 768; 32 and 256 decode tokens):
# the fused Triton kernels (torch and Triton alignment) against the grouped_mm path, with a tile sweep
# (`bench/bench_fused_moe.py`). RESULTS.md, "One fused MoE layer".
set -x
. bench/gpu_env.sh
python3 -c "import triton; print('triton', triton.__version__)"
timeout 70 python3 bench/bench_fused_moe.py --sweep --out $OUT/fused_moe.json 2>&1 | grep -v Warning
