# Last GPU session of this change (after checkpoint_context_fn): GPU tests, replay overhead x2, r3rl check on the probe.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
python3 -m pytest -q -m gpu tests/ --ignore=tests/rollout/test_server.py -p no:cacheprovider 2>&1 | tail -2
for i in 1 2; do
  python3 bench/bench_replay.py --preset probe-qwen3-moe --batch 32 --seq 192 --rounds 15 --out $OUT/replay_$i.json 2>&1 | tail -10
done
for f in none shift; do
  python3 -m r3rl.cli check --preset probe-qwen3-moe --device cuda --batch-size 32 --prompt-len 64 --response-len 128 \
    --use-rollout-routing-replay --enable-r3-correctness-check --inject-fault $f --report $OUT/check_engine_$f.json \
    2>$OUT/check_engine_$f.log | grep -E '"verdict"|"reason"'
done
