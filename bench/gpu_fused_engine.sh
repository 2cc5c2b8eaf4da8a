# End-to-end engine decode with the experts on grouped_mm, fused with torch alignment and fused with Triton
# alignment, one model, interleaved rounds (`bench/bench_fused_engine.py`). RESULTS.md, "Engine decode: fused
# experts vs grouped_mm".
set -x
. bench/gpu_env.sh
cd bench && timeout 150 python3 bench_fused_engine.py --out $OUT/fused_engine.json 2>&1 | grep -v " INFO r3rl"
