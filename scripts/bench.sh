#!/usr/bin/env bash
# Run every benchmark and rewrite the generated part of BENCHMARKS.md (machine, versions, date, numbers).
#   scripts/bench.sh          full run: 3 seeds x 4 datasets x 8 policies + speed ratios (~30 min, 2 cores)
#   scripts/bench.sh --quick  the same code on one seed and two small datasets (~5 min)
# Needs Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or internet for torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh >/dev/null
exec .venv/bin/python scripts/bench/suite.py "$@"
