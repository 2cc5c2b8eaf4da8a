# Where the update's time goes (issue 26): levers side by side and a torch.profiler breakdown, probe and bench shapes.
#   run: PRESETS=probe-qwen3-moe bash bench/gpu_profile_train.sh   (device tool, carry .whl; one preset a call: the
#   levers compile in the first round, and a call has 600 s)
. bench/gpu_env.sh
for preset in ${PRESETS:-probe-qwen3-moe bench-qwen3-moe}; do
  timeout ${TIMEOUT_S:-540} python3 bench/profile_train_step.py --preset $preset --out ${OUT:-/tmp}/profile_$preset.json \
    ${VARIANTS:+--variants $VARIANTS} --rounds ${ROUNDS:-3} \
    2>&1 | grep -v "R3 wrapper\|R3 check" | tail -80
done
