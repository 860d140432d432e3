#!/usr/bin/env bash
# Run benchmarks/gpu_suite.py on an offline machine in one command, from a copy of the repo.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [gpu_suite.py flags, e.g. --resume --budget-s 300]
#
# If .whl/ holds wheels (made by benchmarks/gpu_wheels.sh where there is network), they are
# installed into a private folder first; jaxfl itself is imported from this checkout, so the
# machine's own jax (with its CUDA plugin) is the one measured.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR [gpu_suite.py flags]}
shift
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  site=${JAXFL_WHEEL_SITE:-/tmp/jaxfl_site}
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
PYTHONUNBUFFERED=1 exec "$python" benchmarks/gpu_suite.py --out "$out" "$@"
