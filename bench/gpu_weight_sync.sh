# Weight sync vs model size (`bench/bench_weight_sync.py`, bf16, median of 3): colocated in place and by disk (save,
# load + check, copy in), with the card's copy and file bandwidths. RESULTS.md, "Weight sync".
set -x
. bench/gpu_env.sh
python3 bench/bench_weight_sync.py --rounds 3 --out $OUT/weight_sync.json 2>&1 | grep -v "shards\|Loading weights"
