# GPU session script (issue 3 + re-measure of issue 2's check overhead): run by the device tool from the repo root.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 -m pytest -q -m gpu tests/rollout/test_engine.py tests/test_check.py -p no:cacheprovider 2>&1 | tail -15
python3 bench/bench_replay.py --preset probe-qwen3-moe --batch 32 --seq 192 --rounds 15 --out $OUT/replay.json 2>&1 | tail -9
for f in none shift; do
  python3 -m r3rl.cli check --preset probe-qwen3-moe --rollout engine --dtype bfloat16 --device cuda --batch-size 32 \
    --prompt-len 64 --response-len 128 --use-rollout-routing-replay --enable-r3-correctness-check --inject-fault $f \
    --report $OUT/check_engine_$f.json 2>$OUT/check_engine_$f.log | head -30
done
timeout 330 python3 bench/bench_rollout.py --out $OUT/rollout.json 2>&1 | tail -40
