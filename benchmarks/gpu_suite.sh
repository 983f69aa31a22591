#!/bin/bash
# The GPU suite (issue 13) as one prepared command: per-backbone img/s of the direct port and of the engine at
# batch 32 and 256, trial start-up, Ray overhead with 4 trials packed on the GPU, a reduced whole-study run
# with its projection to the full study, and batch 32 with CUDA graphs (torch.compile) against eager, the compile
# cold and from the cache. Under 8 minutes on one H100 or H200. Prints a summary and writes
# OUTDIR/gpu_suite.json and OUTDIR/gpu_suite.log. Driver and options: benchmarks/gpu_suite.py.
#
# Device command. The GPU machine has PyTorch 2.11, timm and torchvision but no Ray, Optuna, albumentations or
# lime, and no network: they travel as a kit built here once, in the repository root (needs PyPI):
#     bash /work/shared/device/make_kit.sh .devkit && echo /.devkit/ >> .git/info/exclude
# then one device call, carrying the kit (its output comes back from $OUT):
#     run(carry=[".devkit"], timeout_s=560, command=
#         "bash .devkit/install_kit.sh .devkit && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_suite.sh $OUT")
#
# On a CPU, tiny sizes in about a minute (tests/test_gpu_suite.py runs this):
#     bash benchmarks/gpu_suite.sh /tmp/suite --smoke          (PYTHON=... picks the interpreter; default python3)
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_suite.sh OUTDIR [gpu_suite.py options, e.g. --smoke or --compile resnet34]" >&2
    exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
"${PYTHON:-python3}" benchmarks/gpu_suite.py --out "$out/gpu_suite.json" "$@" 2>&1 | tee "$out/gpu_suite.log"
