# The fused router kernel (r3rl.rollout.model.router_kernel) against the torch router, same fused experts: eager CUDA
# time per decode step on the bench shape at batch 32 and 256 (`bench/profile_decode.py --torch-router`).
# RESULTS.md, "Fused router vs torch router".
set -x
. bench/gpu_env.sh
for b in 32 256; do
  for r in "--torch-router" ""; do
    python3 bench/profile_decode.py --preset bench-qwen3-moe --batch $b --rows 22 $r 2>&1 | grep -v INFO \
      | cut -c1-72,150-175 | tail -27
  done
done
