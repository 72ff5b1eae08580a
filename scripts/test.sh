#!/usr/bin/env bash
# Run the test suite (creating the environment first if needed). Extra args go to pytest,
# e.g. `scripts/test.sh -m slow` for the long real runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
