# Sourced at the start of every device run: diffusers wheels from .whl (carried), repo on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
# The run's output folder, and `left N`: the seconds from now to N seconds after the script's START (or its start).
OUT=${OUT:-out}; mkdir -p "$OUT"
left() { echo $(($1 - (SECONDS - ${START:-0}))); }
