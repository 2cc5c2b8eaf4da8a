# Session 16: the MoE block's fused-router GPU test after its fix, then the host's share of a decode step (cProfile,
# CUDA graphs on) at the bench shape, batch 32 and 256.
set -x
. bench/gpu_env.sh
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/rollout/model/test_router_kernel.py 2>&1 | tail -3
for b in 32 256; do
  python3 bench/profile_host.py --preset bench-qwen3-moe --batch $b --rows 30 2>&1 | grep -v INFO | head -48
done
