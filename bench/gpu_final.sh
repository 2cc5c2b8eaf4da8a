# Final GPU session of this change: every GPU number in README.md and bench/RESULTS.md comes from this script's run.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
python3 -m pytest -q -m gpu tests/ --ignore=tests/rollout/test_server.py -p no:cacheprovider 2>&1 | tail -3
for i in 1 2; do
  python3 bench/bench_replay.py --preset probe-qwen3-moe --batch 32 --seq 192 --rounds 15 --out $OUT/replay_$i.json 2>&1 | tail -8
done
for f in none shift permute-layers; do
  python3 -m r3rl.cli check --preset probe-qwen3-moe --device cuda --batch-size 32 --prompt-len 64 --response-len 128 \
    --use-rollout-routing-replay --enable-r3-correctness-check --inject-fault $f --report $OUT/check_engine_$f.json \
    2>$OUT/check_engine_$f.log | grep -E '"verdict"|"reason"'
done
python3 -m r3rl.cli check --preset probe-qwen3-moe --rollout hf --device cuda --batch-size 32 --prompt-len 64 \
  --response-len 128 --use-rollout-routing-replay --enable-r3-correctness-check --report $OUT/check_hf_none.json \
  2>/dev/null | grep -E '"verdict"'
timeout 300 python3 bench/bench_rollout.py --out $OUT/rollout.json 2>&1 | tail -14
