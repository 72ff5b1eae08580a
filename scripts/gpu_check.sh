#!/usr/bin/env bash
# Accelerator check, in parts (PARTS, default "runs scale batch"):
#   runs:  a 1-GPU fine-tune (plain, then compiled with channels_last), the policy demo and a DDP run over every GPU,
#          each printing images/s and peak GPU memory;
#   scale: the throughput benchmark at 224 px bf16 (scripts/bench/scale.py --gpu: finetune against a plain loop, and
#          against timm's train.py when TIMM_TRAIN_PY=PATH names a copy; then the plain loop's knobs (cuDNN
#          autotuning, timm's PrefetchLoader, no per-step wait), finetune under Lightning's simple profiler, the
#          in-memory pair, the loader alone, precision, layout, autotuning off, data.batch_size=auto and loader
#          worker counts one at a time). Each finetune run costs ~80-110 s of start-up on 59,900 files: in a
#          15-minute device session give PARTS=scale SCALE_BUDGET_S=330 (no row starts after it; the JSON is
#          still written);
#   batch: zero-config on 1,000 Fashion-MNIST images per class at data.batch_size 32 against auto (accuracy, time).
# Exits non-zero on any failure. Not part of the test suite (which must pass without a GPU).
# Usage: [PARTS="scale batch"] ./scripts/gpu_check.sh [EXTRA_OVERRIDES...]
# Environment: PY (python with finetune importable; default .venv/bin/python, else python3),
# DATA (an image folder for the runs part instead of building the Fashion-MNIST demo set), SCALE_ROUNDS (default 1),
# SCALE_BUDGET_S (default 0: none), SCALE_OUT and SCALE_LOG (the results and every finetune run's output; default
# scale_gpu.json, scale_gpu.log).
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

result() {  # run folder, name: one RESULT line from its metrics.json
  "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
from pathlib import Path
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
images = m["images"]["train"] * m["epochs"]
test = f", test/acc {m['test/acc']:.4f}" if "test/acc" in m else ""
speed = m.get("throughput") or {}
batch = next((line.split(":", 1)[1].strip() for line in Path(f"{sys.argv[1]}/config.yaml").read_text().splitlines()
              if line.startswith("  batch_size:")), "?")
print(f"RESULT {sys.argv[2]}: {images / m['fit_seconds']:.0f} train images/s (fit {m['fit_seconds']} s incl. validation; "
      f"steps alone {speed.get('train_images_per_s', '?')}), batch {batch}, {m['epochs']} epochs, val/acc "
      f"{m['val/acc']:.4f}{test}, peak GPU memory {m.get('peak_gpu_memory_gb', 'n/a')} GB")
PYEOF
}

run() {  # name, overrides... (later overrides win)
  local name=$1; shift
  local out="$WORK/$name"
  echo "== $name: $*"
  "${FT[@]}" data.root="$DATA" data.image_size=224 policy=full augment=light trainer.max_epochs=2 \
      trainer.enable_progress_bar=false report=false run_dir="$out" "$@" "${EXTRA[@]}"
  result "$out" "$name"
}

EXTRA=("$@")
PARTS=${PARTS:-runs scale batch}
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part runs; then
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
fi
# Throughput against a plain PyTorch loop (and timm's train.py when TIMM_TRAIN_PY names a copy of it) on the 59,900
# Fashion-MNIST files at 224 px, bf16, batch 128, with GPU utilisation and memory (scripts/bench/scale.py --gpu;
# its data is data/bench/fmnist-6k, built from /usr/share/datasets/fashion-mnist when absent).
HAVE_6K=$([ -d data/bench/fmnist-6k ] || [ -d /usr/share/datasets/fashion-mnist ] && echo 1 || echo 0)
if part scale && [ "$HAVE_6K" = 1 ]; then
  echo "== scale: finetune against a plain loop${TIMM_TRAIN_PY:+ and timm train.py}, 224 px bf16"
  PYTHONUNBUFFERED=1 "$PY" scripts/bench/scale.py --gpu --steps 200 --rounds "${SCALE_ROUNDS:-1}" \
      --budget-s "${SCALE_BUDGET_S:-0}" --out "${SCALE_OUT:-scale_gpu.json}" --log "${SCALE_LOG:-scale_gpu.log}"
elif part scale; then
  echo "== scale: skipped (no data/bench/fmnist-6k and no Debian dataset-fashion-mnist to build it from)"
fi
# data.batch_size=auto against 32 where it matters: 10,000 training images (the first 1,000 per class of fmnist-6k),
# zero-config otherwise (recipe=auto chooses size, length and LR; the LR scales with the batch by lr_scaling)
if part batch && [ -d data/bench/fmnist-6k ]; then
  SUB="$WORK/fmnist-1000"
  "$PY" - data/bench/fmnist-6k "$SUB" <<'PYEOF'
import os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for split in ("val", "test"):
    shutil.copytree(src / split, dst / split)
for cls in sorted((src / "train").iterdir()):
    (dst / "train" / cls.name).mkdir(parents=True)
    for f in sorted(cls.iterdir())[:1000]:
        os.link(f, dst / "train" / cls.name / f.name)
PYEOF
  for batch in auto 32; do  # nothing else given: recipe=auto chooses the rest
    echo "== zero_config_batch_$batch"
    "${FT[@]}" data.root="$SUB" trainer=gpu data.batch_size=$batch trainer.enable_progress_bar=false report=false \
        run_dir="$WORK/zero_$batch" "${EXTRA[@]}" 2>&1 | grep -E "data.batch_size|lr_reference|Learning rates|steps of|Finished" || true
    result "$WORK/zero_$batch" "zero_config_batch_$batch"
  done
fi
echo "gpu_check: all parts passed ($PARTS)"
