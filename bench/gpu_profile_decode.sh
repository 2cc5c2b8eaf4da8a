# Where one decode step of the engine goes (torch profiler, eager, `bench/profile_decode.py`) on probe-qwen3-moe:
# the default kernels (fused MoE, paged decode attention) at batch 32 and 256, then the grouped_mm experts at batch
# 32 for comparison. RESULTS.md, "Decode-step kernel profile".
set -x
. bench/gpu_env.sh
python3 bench/profile_decode.py --preset probe-qwen3-moe --batch 32 --rows 40
python3 bench/profile_decode.py --preset probe-qwen3-moe --batch 256 --rows 40
python3 bench/profile_decode.py --preset probe-qwen3-moe --batch 32 --rows 25 --moe-kernel grouped_mm
