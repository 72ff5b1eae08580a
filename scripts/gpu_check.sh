#!/usr/bin/env bash
# Accelerator check: on a machine with NVIDIA GPUs, a 1-GPU fine-tune (plain, then compiled with
# channels_last) and a DDP run over every GPU, each printing images/s and peak GPU memory, then the
# throughput benchmark at 224 px bf16 (scripts/bench/scale.py --gpu: finetune against a plain loop, and
# against timm's train.py when TIMM_TRAIN_PY=PATH names a copy); exits non-zero on any failure. Not part of the test
# suite (which must pass without a GPU). Usage: ./scripts/gpu_check.sh [EXTRA_OVERRIDES...]
# Environment: PY (python with finetune importable; default .venv/bin/python, else python3),
# DATA (an image folder to use instead of building the Fashion-MNIST demo set).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -c "import finetune" 2>/dev/null || { echo "finetune is not importable by $PY: run ./scripts/setup_env.sh first" >&2; exit 1; }
FT=("$PY" -m finetune)
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "no CUDA GPU visible to torch" >&2; exit 1; }
"$PY" -c "import torch; [print(f'GPU {i}: {torch.cuda.get_device_name(i)}') for i in range(torch.cuda.device_count())]"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "${DATA:-}" ]; then
  echo "data: $DATA"
elif DATA="$WORK/data" && [ -d /usr/share/datasets/fashion-mnist ]; then
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

run() {  # name, overrides... (later overrides win)
  local name=$1; shift
  local out="$WORK/$name"
  echo "== $name: $*"
  "${FT[@]}" data.root="$DATA" data.image_size=224 policy=full augment=light trainer.max_epochs=2 \
      trainer.enable_progress_bar=false report=false run_dir="$out" "$@" "${EXTRA[@]}"
  "$PY" - "$out" "$name" <<'PYEOF'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
images = m["images"]["train"] * m["epochs"]
test = f", test/acc {m['test/acc']:.4f}" if "test/acc" in m else ""
print(f"RESULT {sys.argv[2]}: {images / m['fit_seconds']:.0f} train images/s (fit {m['fit_seconds']} s incl. validation), "
      f"{m['epochs']} epochs, val/acc {m['val/acc']:.4f}{test}, peak GPU memory {m.get('peak_gpu_memory_gb', 'n/a')} GB")
PYEOF
}
EXTRA=("$@")
run one_gpu trainer=gpu
run one_gpu_compiled trainer=gpu model.compile=true model.channels_last=true
# The policy issue's demo recipe (64 px, auto, 10 epochs) on the GPU, fp32 as on CPU
run auto_demo_64px trainer=gpu trainer.precision=32 data.image_size=64 policy=auto scheduler=onecycle augment=none \
    trainer.max_epochs=10 report=true
if [ "$GPUS" -ge 2 ]; then
  run ddp_all trainer=ddp trainer.devices="$GPUS"
else
  run ddp_one trainer=ddp trainer.devices=1
fi
# Throughput against a plain PyTorch loop (and timm's train.py when TIMM_TRAIN_PY names a copy of it) on the 59,900
# Fashion-MNIST files at 224 px, bf16, batch 128, with GPU utilisation and memory (scripts/bench/scale.py --gpu;
# its data is data/bench/fmnist-6k, built from /usr/share/datasets/fashion-mnist when absent).
if [ -d data/bench/fmnist-6k ] || [ -d /usr/share/datasets/fashion-mnist ]; then
  echo "== scale: finetune against a plain loop${TIMM_TRAIN_PY:+ and timm train.py}, 224 px bf16"
  "$PY" scripts/bench/scale.py --gpu --steps 200 --rounds "${SCALE_ROUNDS:-1}" --out "$WORK/scale_gpu.json"
  cp "$WORK/scale_gpu.json" "${SCALE_OUT:-scale_gpu.json}"
else
  echo "== scale: skipped (no data/bench/fmnist-6k and no Debian dataset-fashion-mnist to build it from)"
fi
echo "gpu_check: all runs passed"
