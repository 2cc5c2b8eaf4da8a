# One training step on probe-qwen3-moe (`bench/bench_train_step.py`): stage times, update tokens/s, MFU, and the
# update with R3 and R3 + check against no replay, interleaved rounds. RESULTS.md, "One training step".
set -x
. bench/gpu_env.sh
for compile in "" "--compile"; do  # eager, then r3rl train --compile (R3 / check ratios under each)
  python3 bench/bench_train_step.py --preset ${PRESET:-probe-qwen3-moe} --rounds ${ROUNDS:-9} $compile \
    --out $OUT/train_step${compile:+_compile}.json 2>&1 | grep -v "R3 wrapper\|R3 check" | tail -40
done
