# Where the update's time goes (issue 26): levers side by side and a torch.profiler breakdown, probe and bench shapes.
#   run: bash bench/gpu_profile_train.sh   (device tool, carry .whl)
. bench/gpu_env.sh
for preset in ${PRESETS:-probe-qwen3-moe bench-qwen3-moe}; do
  timeout ${TIMEOUT_S:-300} python3 bench/profile_train_step.py --preset $preset --out ${OUT:-/tmp}/profile_$preset.json \
    ${VARIANTS:+--variants $VARIANTS} --rounds ${ROUNDS:-3} \
    2>&1 | grep -v "R3 wrapper\|R3 check" | tail -80
done
