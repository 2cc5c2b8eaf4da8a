# The engine with the fused Triton MoE kernels as its CUDA default: the GPU tests (kernels, engine, families under
# CUDA graphs), engine vs HF generate on probe-qwen3-moe (interleaved rounds, % of the bandwidth floor, the
# correctness gate), and `r3rl check` in bf16 on the probes not checked before (MiniMax-M2, GPT-OSS).
set -x
. bench/gpu_env.sh
python3 -c "import triton; print('triton', triton.__version__)"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/rollout/model/test_fused_moe.py tests/rollout/engine/test_engine.py \
  tests/rollout/engine/test_engine_families.py 2>&1 | tail -15
timeout 200 python3 bench/bench_rollout.py --presets probe-qwen3-moe --batches 32 256 --rounds 5 --hf-rounds 2 \
  --out $OUT/rollout_probe_fused.json 2>&1 | grep -v " INFO "
for p in probe-minimax-m2 probe-gpt-oss; do
  timeout 100 python3 -m r3rl.cli check --preset $p --device cuda --dtype bfloat16 --use-rollout-routing-replay \
    --enable-r3-correctness-check --batch-size 8 --prompt-len 32 --response-len 32 --report $OUT/check_$p.json \
    2>&1 | grep -E "verdict|R3 check|mismatch tokens"
  python3 -c "import json; r=json.load(open('$OUT/check_$p.json')); print('$p', {k: r[k] for k in ('verdict',) if k in r}, r.get('without_replay'), r.get('with_replay'))"
done
