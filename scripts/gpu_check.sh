#!/usr/bin/env bash
# Accelerator check: on a machine with NVIDIA GPUs, a 1-GPU fine-tune (plain, then compiled with
# channels_last) and a DDP run over every GPU,
# each printing images/s and peak GPU memory; exits non-zero on any failure. Not part of the test
# suite (which must pass without a GPU). Usage: ./scripts/gpu_check.sh [EXTRA_OVERRIDES...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FT=${FT:-.venv/bin/finetune}
[ -x "$FT" ] || { echo "run ./scripts/setup_env.sh first" >&2; exit 1; }
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "no CUDA GPU visible to torch" >&2; exit 1; }
"$PY" -c "import torch; [print(f'GPU {i}: {torch.cuda.get_device_name(i)}') for i in range(torch.cuda.device_count())]"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
DATA="$WORK/data"
if [ -d /usr/share/datasets/fashion-mnist ]; then
  "$PY" scripts/make_demo_data.py --out "$DATA" >/dev/null
else  # no Debian dataset here: generated images, 3 classes x 200
  "$PY" - "$DATA" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
for split, n in (("train", 160), ("val", 20), ("test", 20)):
    for c in range(3):
        d = root / split / f"class{c}"; d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 60, (96, 96, 3), dtype=np.uint8); img[c * 30:(c + 1) * 30] = 220
            Image.fromarray(img).save(d / f"{i}.png")
PYEOF
fi

run() {  # name, overrides...
  local name=$1; shift
  local out="$WORK/$name"
  echo "== $name: $*"
  "$FT" data.root="$DATA" data.image_size=224 policy=full augment=light trainer.max_epochs=2 \
      trainer.enable_progress_bar=false report=false run_dir="$out" "$@" "${EXTRA[@]}"
  "$PY" - "$out" "$name" <<'PYEOF'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
images = m["images"]["train"] * m["epochs"]
print(f"RESULT {sys.argv[2]}: {images / m['fit_seconds']:.0f} train images/s (fit {m['fit_seconds']} s incl. validation), "
      f"val/acc {m['val/acc']:.4f}, peak GPU memory {m.get('peak_gpu_memory_gb', 'n/a')} GB")
PYEOF
}
EXTRA=("$@")
run one_gpu trainer=gpu
run one_gpu_compiled trainer=gpu model.compile=true model.channels_last=true
if [ "$GPUS" -ge 2 ]; then
  run ddp_all trainer=ddp trainer.devices="$GPUS"
else
  run ddp_one trainer=ddp trainer.devices=1
fi
echo "gpu_check: all runs passed"
