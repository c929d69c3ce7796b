# Sourced at the start of every device run: diffusers wheels from .whl (carried), repo on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
if [ -f .tools/py-spy.xz ]; then  # a carried profiler (xz of py-spy's binary), for runs that sample their threads
  mkdir -p /tmp/site/bin && python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" \
    .tools/py-spy.xz /tmp/site/bin/py-spy && chmod +x /tmp/site/bin/py-spy
fi
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
# The run's output folder, and `left N`: the seconds from now to N seconds after the script's START (or its start).
OUT=${OUT:-out}; mkdir -p "$OUT"
left() { echo $(($1 - (SECONDS - ${START:-0}))); }
