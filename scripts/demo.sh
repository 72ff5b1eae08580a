#!/usr/bin/env bash
# End-to-end demo: set up the environment, build a few-shot Fashion-MNIST
# ImageFolder from real images, fine-tune on it, and print the run folder.
#
# Usage: scripts/demo.sh [extra finetune overrides...]   (from any directory)
# Environment: DEMO_EPOCHS (default: chosen by recipe=auto).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# 1. Environment (.venv with the package installed).
bash scripts/setup_env.sh

# 2. Fashion-MNIST from Debian, where we can install it; otherwise
#    make_demo_data.py falls back to a torchvision download.
data_dir=/usr/share/datasets/fashion-mnist
as_root=(env)
[[ $(id -u) -eq 0 ]] || as_root=(sudo -n env)
if [[ ! -d $data_dir ]] && command -v apt-get >/dev/null &&
   { [[ $(id -u) -eq 0 ]] || sudo -n true 2>/dev/null; }; then
    echo "Installing dataset-fashion-mnist with apt-get ..."
    { "${as_root[@]}" DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      "${as_root[@]}" DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } ||
        echo "apt-get failed; carrying on (make_demo_data.py will try torchvision)." >&2
fi

# 3. The demo ImageFolder (rebuilt from scratch each time, deterministic).
.venv/bin/python scripts/make_demo_data.py

# 4. Fine-tune with nothing but the data: recipe=auto chooses the input size, length, LR, schedule and
#    augmentation from the images and says why (the "Recipe (auto)" block, RUN/recipe.json, the report).
#    finetune's last line is "Run folder: <path>". DEMO_EPOCHS=N overrides the chosen length.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
.venv/bin/finetune data.root=data/fashion_mnist_fewshot ${DEMO_EPOCHS:+trainer.max_epochs="$DEMO_EPOCHS"} "$@" | tee "$log"

run_folder=$(sed -n 's/^Run folder: //p' "$log" | tail -n 1)
if [[ -z $run_folder ]]; then
    echo "Demo failed: finetune did not print a 'Run folder:' line." >&2
    exit 1
fi
echo "Demo finished. Run folder: $run_folder"
