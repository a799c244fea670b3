#!/usr/bin/env bash
# gpu_check on a lent GPU machine whose image has a CUDA torch (and Triton) but not dstp's
# pure-Python dependencies, and no network: installs the wheels carried in .whl/ (which
# ones: benchmarks/FINDINGS.md, "The first GPU run"), makes dstp importable from this
# working tree (the editable install did not take on that image: "The second GPU run"),
# then runs benchmarks/gpu_check.py with this script's arguments.
#
#   bash benchmarks/gpu_image.sh --only triton_decode,speed --out "$OUT/gc"
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
ln -sfn "$PWD/policies" dstp/policies  # setup.cfg maps policies/ to dstp.policies
export PYTHONPATH="/tmp/site:$PWD" DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
