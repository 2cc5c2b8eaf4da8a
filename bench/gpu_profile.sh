set -x
export PYTHONPATH=$PWD/src
python3 bench/profile_decode.py --preset probe-qwen3-moe --batch 32 2>&1 | tail -45
