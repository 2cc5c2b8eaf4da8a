# Where one decode step of the engine goes (torch profiler, eager): experts through grouped_mm, then through the
# fused MoE Triton kernels.
set -x
. bench/gpu_env.sh
python3 bench/profile_decode.py --preset probe-qwen3-moe --batch 32 2>&1 | tail -45
python3 bench/profile_decode.py --preset probe-qwen3-moe --batch 32 --fused-moe 2>&1 | tail -45
