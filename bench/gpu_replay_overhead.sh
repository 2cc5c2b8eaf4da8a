# Replay and check overhead on a training forward+backward of probe-qwen3-moe (two runs: the machine is noisy).
# RESULTS.md, "Replay and check overhead".
set -x
. bench/gpu_env.sh
for i in 1 2; do
  python3 bench/bench_replay.py --preset probe-qwen3-moe --batch 32 --seq 192 --rounds 15 --out $OUT/replay_$i.json 2>&1 | tail -10
done
