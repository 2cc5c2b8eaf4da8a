set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
python3 -m pytest -q -m gpu tests/test_check.py -p no:cacheprovider 2>&1 | tail -5
python3 bench/bench_replay.py --preset probe-qwen3-moe --batch 32 --seq 192 --rounds 15 --out $OUT/replay.json 2>&1 | tail -25
for f in none shift; do python3 -m r3rl.cli check --preset probe-qwen3-moe --dtype bfloat16 --device cuda --batch-size 32 --prompt-len 64 --response-len 128 --use-rollout-routing-replay --enable-r3-correctness-check --inject-fault $f --report $OUT/check_probe_$f.json 2>$OUT/check_probe_$f.log | tail -30; echo "exit=$?"; done
python3 -m r3rl.cli check --preset tiny-qwen3-moe --dtype bfloat16 --device cuda --use-rollout-routing-replay --ci-test --report $OUT/check_tiny_bf16.json 2>&1 | tail -16
