#!/usr/bin/env bash
# Download, here (with network), the wheels that an offline GPU machine lacks to import jaxfl.
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/ (git-ignored), for CPython 3.12 x86-64
#   PY_VERSION=3.11 bash benchmarks/gpu_wheels.sh /tmp/wheels
#
# The GPU machine is assumed to have jax (CUDA), flax, optax, chex, orbax-checkpoint, numpy,
# scipy, matplotlib, tqdm, absl-py, attrs, mpmath, PyYAML, wrapt and packaging already; what
# jaxfl needs beyond those is downloaded without dependencies, pinned to the versions installed
# in this Python (the ones the test suite ran with) or the newest where none is installed.
# benchmarks/gpu_suite.sh installs them there with `pip install --no-index --target`.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py_version=${PY_VERSION:-3.12}
python=${PYTHON:-python3}
packages=(ml-collections dp-accounting dm-tree tenseal nibabel cryptography cffi pycparser)

specs=()
for name in "${packages[@]}"; do
  version=$("$python" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
  specs+=("$name${version:+==$version}")
done

mkdir -p "$dest"
rm -f "$dest"/*.whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$py_version" --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dest" "${specs[@]}"
echo "gpu_wheels: ${specs[*]} -> $dest ($(du -sh "$dest" | cut -f1))"
