# Session 15, second run: the new kernels (one-pass sampler, q/k norm + RoPE + KV write, HF-rounded GLU in the
# fused experts) on the GPU: the GPU tests, engine vs HF on the probe and bench shapes, GPT-OSS's gate, and the
# eager decode profile of probe-qwen3-moe at 32/256.
set -x
. bench/gpu_env.sh
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ -rA 2>&1 | grep -v "^PASSED" | tail -40 > $OUT/gpu_tests.txt
tail -12 $OUT/gpu_tests.txt
timeout 200 python3 bench/bench_rollout.py --presets probe-qwen3-moe bench-qwen3-moe --batches 32 256 --rounds 4 \
  --hf-rounds 1 --out $OUT/rollout.json 2>&1 | grep -v " INFO " | tail -14
timeout 80 python3 bench/bench_rollout.py --presets probe-gpt-oss --batches 32 --rounds 2 --hf-rounds 1 \
  --out $OUT/rollout_gptoss.json 2>&1 | grep -v " INFO " | tail -8
for b in 32 256; do
  timeout 50 python3 bench/profile_decode.py --preset probe-qwen3-moe --batch $b --rows 45 2>&1 | grep -v " INFO " > $OUT/profile_b$b.txt
  tail -1 $OUT/profile_b$b.txt
done
