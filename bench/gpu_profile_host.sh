# Host time per decode step (cProfile, CUDA graphs on, sampled wall time) at the bench shape, batch 32 and 256
# (`bench/profile_host.py`). RESULTS.md, "Host time per decode step".
set -x
. bench/gpu_env.sh
for b in 32 256; do
  python3 bench/profile_host.py --preset bench-qwen3-moe --batch $b --rows 30 2>&1 | grep -v INFO | head -48
done
