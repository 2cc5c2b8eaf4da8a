# Sourced by every gpu_*.sh recipe (the device tool runs them from the repo root): installs the carried wheels
# (fastapi, starlette, pydantic, uvicorn: the GPU image lacks them) and puts src/ on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
