# What R3 does to an RL run (issue 22; its on-policy arm is issue 19's GPU run): bench-qwen3-moe (1 B params: fp32
# master weights + Adam fit one H100; PRESET=probe-qwen3-moe needs an H200), rollout by the
# engine in bf16 (CUDA graphs, fused kernels), trainer under torchrun + FSDP2 with fp32 master weights and bf16
# compute (mixed precision, as in production); a reverse task over 200-character strings, so responses are ~200
# tokens; a short warm-up (routers not saturated). Modes, seeds and the off-policy batch come from the environment:
#   MODES="r3 r2 none" SEEDS="1 2" STEPS=5 GBS=16 bash bench/gpu_r3_effect.sh    # 4 optimizer steps per rollout
#   MODES="r3 none" SEEDS="1 2" STEPS=5 GBS= bash bench/gpu_r3_effect.sh         # on-policy
# Every run's metrics.jsonl and log go into $OUT/r3_effect.tgz; `python bench/r3_effect_table.py DIR` tabulates.
set -x
. bench/gpu_env.sh
python3 - <<'PY'
import json, random
rng = random.Random(0)
with open("/tmp/rev200.jsonl", "w") as f:
    for _ in range(1024):
        s = "".join(rng.choice("abcdef") for _ in range(200))
        f.write(json.dumps({"prompt": f"rev:{s}=", "label": s[::-1]}) + "\n")
PY
PROMPTS=${PROMPTS:-8}
COMMON="--preset ${PRESET:-bench-qwen3-moe} --device cuda --dtype bfloat16 --rollout-dtype bfloat16 --num-rollout ${STEPS:-5}
  --prompt-data /tmp/rev200.jsonl --reward-fn position_match --rollout-batch-size $PROMPTS --n-samples-per-prompt 8
  --rollout-max-response-len 256 --sft-steps ${SFT:-10} --sft-batch-size 16 --sft-lr 5e-4 --lr ${LR:-1e-5}
  --micro-batch-size 16 --eval-interval 0 --no-progress --no-plots --enable-r3-correctness-check"
[ -n "$GBS" ] && COMMON="$COMMON --global-batch-size $GBS"
mkdir -p /tmp/r3e
for SEED in ${SEEDS:-1 2}; do
  for MODE in ${MODES:-r3 r2 none}; do
    case $MODE in r3) FLAG=--use-rollout-routing-replay;; r2) FLAG=--use-routing-replay;; *) FLAG=;; esac
    RUN=/tmp/r3e/${TAG}${MODE}_s$SEED
    timeout ${RUN_TIMEOUT:-170} torchrun --nproc-per-node 1 -m r3rl train $COMMON $FLAG --seed $SEED --run-dir $RUN \
      2>/tmp/r3e/${TAG}${MODE}_s$SEED.log | grep -E '"verdict"|"error"|"steps"'
    grep -E "routing_mismatch=|R3 mismatch" /tmp/r3e/${TAG}${MODE}_s$SEED.log | tail -2 | cut -c1-400
  done
done
tar czf $OUT/r3_effect.tgz -C /tmp r3e
