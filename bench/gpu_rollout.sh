# Rollout engine throughput against HF generate (bench_rollout.py).
set -x
. bench/gpu_env.sh
timeout 300 python3 bench/bench_rollout.py --out $OUT/rollout.json 2>&1 | tail -14
