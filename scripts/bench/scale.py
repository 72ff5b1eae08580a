"""Training throughput on a large image set: finetune against a plain PyTorch loop on the same files.

    .venv/bin/python scripts/bench/scale.py [--quick] [--steps 150] [--out scale.json]

Data: the real Fashion-MNIST training file written as PNG files (28 px grayscale; 5,990 per class = 59,900
files, plus 10 validation and 200 test images per class: `fmnist-6k`), and for the streaming memory check
the same images written at five sizes (28, 42, 56, 70, 84 px: 299,500 files, `fmnist-6k-x5`). `--quick`
uses 600 per class (6,000 and 30,000 files).

Each contender trains the same model (tf_efficientnet_lite0 with the bundled ImageNet weights, a new
10-class head, every layer trained, channels_last) on the same files at 64 px (no augmentation, the whole
frame), batch 32, AdamW (lr 1e-3, weight decay 0.01), for `--steps` steps; the first 5 are not timed. The
pairs below alternate for `--rounds` rounds; each contender's fastest round is compared (on a shared machine
interference only slows a run), and the medians are reported too.
Images/s = timed images / (time waiting for the next batch + time in the step), the way finetune's own
`TrainThroughput` reports it, so both sides are measured alike:

- in memory: finetune's default (`data.preload=auto` decodes the files once; `num_workers=auto` = 0) against a
  loop over the same decoded arrays (0 workers);
- streaming: finetune with `data.preload=false` (each file decoded per item in loader workers, `auto`) against
  the loop a practitioner writes (torchvision `ImageFolder` + transforms, the same number of workers).

Every contender runs in its own process (one at a time: two CPU-heavy jobs slow each other 5-10x), which
reports its peak resident memory. timm's `train.py` is not compared: it is not in the timm wheel, and this
machine cannot reach GitHub.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BATCH, LR, WEIGHT_DECAY, SIZE, SKIP = 32, 1e-3, 0.01, 64, 5
SIZES_X5 = (28, 42, 56, 70, 84)
TIMM_SKIPPED = ("not run: timm's train.py is not in the timm wheel (it lives in the GitHub repository, which this "
                "machine cannot reach)")


def make_sets(root: Path, per_class: int) -> tuple[Path, Path]:
    """(the PNG set, the same images at five sizes); written once."""
    from PIL import Image

    base = root / ("fmnist-6k" if per_class == 5990 else f"fmnist-{per_class}pc")
    if not (base / "train").is_dir():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(base),
                        "--train-per-class", str(per_class), "--val-per-class", "10", "--test-per-class", "200"],
                       check=True, stdout=subprocess.DEVNULL)
    many = root / f"{base.name}-x5"
    if not (many / "done").is_file():
        many.mkdir(parents=True, exist_ok=True)
        for split in ("val", "test"):
            if not (many / split).exists():
                shutil.copytree(base / split, many / split)
        for path in sorted((base / "train").rglob("*.png")):
            out = many / "train" / path.parent.name
            out.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as im:
                for side in SIZES_X5:
                    (im if side == im.width else im.resize((side, side), Image.BICUBIC)).save(
                        out / f"{path.stem}_{side}.png")
        (many / "done").write_text("ok")
    return base, many


def run_finetune(root: Path, steps: int, stream: bool) -> dict:
    """The finetune CLI for `steps` steps; its metrics.json throughput and the wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = subprocess.run(
            [str(BIN / "finetune"), f"data.root={root}", f"run_dir={tmp}/run", "recipe=off", "policy=full",
             f"trainer.max_steps={steps}", "trainer.max_epochs=1", f"data.image_size={SIZE}", "data.crop_pct=1.0",
             "augment=none", "model.channels_last=true", f"data.batch_size={BATCH}", "optimizer=adamw",
             f"optimizer.lr={LR}", f"optimizer.weight_decay={WEIGHT_DECAY}", "report=false",
             "trainer.enable_progress_bar=false", *(["data.preload=false"] if stream else [])],
            capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"finetune failed:\n{result.stderr[-3000:]}")
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    speed = metrics["throughput"]
    workers = next((line.rsplit(":", 1)[1].strip() for line in result.stdout.splitlines() + result.stderr.splitlines()
                    if "loader workers:" in line), "?")
    return {"images_per_s": speed["train_images_per_s"], "wait_share": speed["loader_wait_share"],
            "peak_rss_gb": speed["peak_rss_gb"], "workers": workers, "wall_s": round(wall, 1)}


def plain_loop(root: str, steps: int, stream: bool, workers: int) -> dict:
    """The plain loop (runs in a child process: `--plain`)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset
    from torchvision import datasets, transforms

    from finetune.conf import preset
    from finetune.data.datamodule import decode_all, decode_side
    from finetune.data.transforms import resolve_preprocessing, train_transform
    from finetune.models.backbone import load_pretrained
    from finetune.throughput import peak_rss_gb

    torch.manual_seed(0)
    model, _, _ = load_pretrained("tf_efficientnet_lite0", "auto")
    model.reset_classifier(10)
    model = model.to(memory_format=torch.channels_last)
    pp = resolve_preprocessing(model, {"image_size": SIZE, "crop_pct": 1.0})
    bicubic = transforms.InterpolationMode.BICUBIC
    to_tensor = transforms.Compose([transforms.Resize((SIZE, SIZE), interpolation=bicubic), transforms.ToTensor(),
                                    transforms.Normalize(pp.mean, pp.std)])
    if stream:
        dataset = datasets.ImageFolder(str(Path(root) / "train"),
                                       transform=transforms.Compose([transforms.Grayscale(3), to_tensor]))
    else:
        folder = datasets.ImageFolder(str(Path(root) / "train"))
        images = decode_all([p for p, _ in folder.samples], decode_side(pp), float("inf"))
        transform = train_transform(pp, preset("augment", "none"), 0)  # resize + normalize, as finetune's

        class Decoded(Dataset):
            def __len__(self):
                return len(images)

            def __getitem__(self, i):
                return transform(image=images[i])["image"], folder.targets[i]

        dataset = Decoded()
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model.train()
    wait = total = 0.0
    timed = 0
    last_end = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        fetched = time.perf_counter()
        loss = F.cross_entropy(model(x.to(memory_format=torch.channels_last)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        end = time.perf_counter()
        if step >= SKIP:
            wait += fetched - last_end
            total += end - last_end
            timed += len(y)
        last_end = end
        if step + 1 >= steps:
            break
    del loader  # the workers end, so their peak is counted
    return {"images_per_s": round(timed / total, 1), "wait_share": round(wait / total, 3),
            "peak_rss_gb": peak_rss_gb(), "workers": workers}


def run_plain(root: Path, steps: int, stream: bool, workers: int) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--plain", str(root), str(steps), str(int(stream)),
                             str(workers)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - started, 1)}


def _ratio(rows: dict, ours: str, theirs: str) -> dict:
    """finetune / plain loop images/s: of the fastest rounds, and of the medians."""
    import statistics

    mine, other = rows[ours]["rounds_images_per_s"], rows[theirs]["rounds_images_per_s"]
    return {"fastest": round(max(mine) / max(other), 3),
            "median": round(statistics.median(mine) / statistics.median(other), 3)}


STREAMED = "finetune, streaming"
PLAIN_STREAMED = "plain loop, streaming (ImageFolder)"
IN_MEMORY, PLAIN_IN_MEMORY = "finetune, in memory", "plain loop, in memory"


def measure(data: Path, quick: bool = False, steps: int | None = None, rounds: int = 3, log=print) -> dict:
    """Every contender, `rounds` alternating rounds of the two pairs, then the 5x set once (the suite's entry)."""
    steps = steps or (40 if quick else 150)
    base, many = make_sets(data, 600 if quick else 5990)
    workers = min(4, max(1, (os.cpu_count() or 2) - 1))  # finetune's num_workers=auto for streamed data
    pairs = [
        (IN_MEMORY, lambda: run_finetune(base, steps, stream=False)),
        (PLAIN_IN_MEMORY, lambda: run_plain(base, steps, stream=False, workers=0)),
        (STREAMED, lambda: run_finetune(base, steps, stream=True)),
        (PLAIN_STREAMED, lambda: run_plain(base, steps, stream=True, workers=workers)),
    ]
    runs: dict[str, list[dict]] = {name: [] for name, _ in pairs}
    for r in range(rounds):  # alternating, so a slow spell of the shared machine hits both sides
        for name, run in pairs:
            runs[name].append(run())
            log(f"scale round {r + 1}, {name}: {runs[name][-1]['images_per_s']} images/s")
    # The fastest round of each (interference on a shared machine only ever slows a run), with every round's
    rows = {name: {**max(done, key=lambda d: d["images_per_s"]),
                   "rounds_images_per_s": [d["images_per_s"] for d in done]} for name, done in runs.items()}
    rows[f"{STREAMED}, {many.name}"] = run_finetune(many, steps, stream=True)
    log(f"scale {many.name}: {rows[f'{STREAMED}, {many.name}']}")
    train_files = sum(1 for _ in (base / "train").rglob("*.png"))
    return {
        "set": base.name, "many_set": many.name, "train_files": train_files,
        "many_files": train_files * len(SIZES_X5), "steps": steps, "batch": BATCH, "image_size": SIZE,
        "cpus": os.cpu_count(), "rounds": rounds, "rows": rows, "timm_train": TIMM_SKIPPED,
        "ratio_in_memory": _ratio(rows, IN_MEMORY, PLAIN_IN_MEMORY),
        "ratio_streaming": _ratio(rows, STREAMED, PLAIN_STREAMED),
        "rss_many_over_base": round(rows[f"{STREAMED}, {many.name}"]["peak_rss_gb"]["process"]
                                    / rows[STREAMED]["peak_rss_gb"]["process"], 3),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        _, _, root, steps, stream, workers = sys.argv
        print(json.dumps(plain_loop(root, int(steps), bool(int(stream)), int(workers))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="600 images per class, 40 steps")
    parser.add_argument("--steps", type=int, help="training steps per contender (default 150; --quick 40)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each pair (default 3)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(args.data, args.quick, args.steps, args.rounds)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
