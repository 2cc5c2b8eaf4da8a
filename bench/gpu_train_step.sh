# One training step on probe-qwen3-moe (`bench/bench_train_step.py`): stage times, update tokens/s, MFU, and the
# update with R3 and R3 + check against no replay, interleaved rounds. RESULTS.md, "One training step".
set -x
. bench/gpu_env.sh
python3 bench/bench_train_step.py --preset probe-qwen3-moe --rounds 9 --out $OUT/train_step.json 2>&1 | tail -30
