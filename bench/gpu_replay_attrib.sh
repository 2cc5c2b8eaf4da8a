# GPU session: replay/check overhead on the padded-layout path after the live-top-k pad shortcut (two runs, with
# per-piece micro timings and an R2-batch mode for attribution), plus the GPU tests.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
python3 -m pytest -q -m gpu tests/ --ignore=tests/rollout/test_server.py -p no:cacheprovider 2>&1 | tail -2
for i in 1 2; do
  python3 bench/bench_replay.py --preset probe-qwen3-moe --batch 32 --seq 192 --rounds 15 --out $OUT/replay_$i.json 2>&1 | tail -10
done
