# The GPU-marked tests (CUDA graphs, device-side replay, no host sync on the hot path, the Triton kernels in bf16).
# RESULTS.md, "GPU tests".
set -x
. bench/gpu_env.sh
python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -4
