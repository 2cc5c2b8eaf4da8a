# R3 on a megatron-core GPTModel (local spec, MoE + dense layers, full recompute) on one GPU: the GPU test of
# tests/megatron (evidence lines in both stages, check passing, experts used read at the token dispatcher equal to the
# traces, a shifted trace failing), then the CPU tests of tests/megatron on the same machine.
# The GPU image has no megatron-core: carry its py3.12 wheel in .whl (docs/megatron.md, "GPU run"):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
set -o pipefail
. bench/gpu_env.sh
python3 -c "import megatron.core; print('megatron-core', megatron.core.__version__)"
python3 -m pytest -q -s -p no:cacheprovider tests/megatron/test_gpu_gptmodel.py \
  2>&1 | tee ${OUT:-/tmp}/megatron_gpu.log | grep -E "^R3 |AssertionError|passed|failed|error"
OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/megatron 2>&1 | tail -3
