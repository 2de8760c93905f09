#!/usr/bin/env bash
# Prepare, on the CPU machine, what a device machine needs to run bench/gpu_checks.sh, into
# .gpu/ (ignored by git; name it in the device tool's `carry`):
#   .gpu/site312.tar.xz  rayrec's dependencies that the device image lacks, for its Python 3.12
#                        (Ray 2.60 without its Java jars, RLlib and the dashboard's web client,
#                        which rayrec never starts; HyperOpt; jsonschema; pydantic; tensorboardX),
#                        about 28 MB: the whole Ray wheel (79 MB) is over the 64 MiB a call carries;
#   .gpu/data/           the real datasets the checks read (about 11 MB).
#
#   bash bench/gpu_prepare.sh          # once per session; about 2 minutes (xz -9)
#
# Then, on the device machine (one call; see docs/benchmarks.md, "GPU session"):
#   mkdir -p /tmp/site && tar -xJf .gpu/site312.tar.xz -C /tmp/site &&
#   PYTHONPATH=/tmp/site RAYREC_SHARED_DATA=$PWD/.gpu/data OUT=/tmp/rayrec-gpu bash bench/gpu_checks.sh
# The device image already holds torch (CUDA), numpy, pandas, pyarrow, fsspec, scipy,
# scikit-learn, matplotlib, typer, rich and pyyaml; W&B is not carried (the checks log nothing to it).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${RAYREC_SHARED_DATA:-../shared/data}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }
mkdir -p .gpu/data
for d in ml-1m-gsasrec gowalla beauty; do cp -r "$DATA/$d" .gpu/data/; done
if [ ! -s .gpu/site312.tar.xz ]; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --target "$site" ray==2.60.0 hyperopt==0.3.0 jsonschema jsonschema-specifications referencing rpds-py \
      pydantic pydantic-core annotated-types typing-inspection tensorboardX
  rm -rf "$site/ray/jars" "$site/ray/rllib" "$site/ray/dashboard/client/build" "$site/bin"
  find "$site" -name __pycache__ -prune -exec rm -rf {} +
  tar -cf - -C "$site" . | xz -9 -T0 > .gpu/site312.tar.xz
  rm -rf "$site"
fi
du -sh .gpu
