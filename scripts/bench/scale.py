"""Training throughput on a large image set: finetune against a plain PyTorch loop on the same files.

    .venv/bin/python scripts/bench/scale.py [--quick] [--steps 150] [--out scale.json] [--timm-train PATH]
        [--gpu] [--write [--from scale.json]]

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
  the loop a practitioner writes (torchvision `ImageFolder` + transforms, the same number of workers);
- finetune's training loader alone, in memory and streaming (no model: batches moved to the device and
  normalised there, as a run does), once each: the images/s the input pipeline can deliver, beside what the
  training reaches.

Every contender runs in its own process (one at a time: two CPU-heavy jobs slow each other 5-10x), which
reports its peak resident memory.

timm's `train.py` (the reference training script of the timm repository; it is not in the timm wheel or sdist,
so give a copy: `--timm-train PATH` or `TIMM_TRAIN_PY=PATH`) joins the streaming pair: the same files, model
and weights (`--initial-checkpoint`, written from finetune's bundled weights with the new head), `--img-size 64
--crop-pct 1.0 --no-aug`, batch 32, AdamW, no label smoothing, channels_last, the same number of loader
workers, on the CPU (`device: cpu` through its `-c` YAML). Its own prefetching loader (uint8 batches,
normalised after the transfer) is kept. It logs every 5 updates the mean update time (waiting for the batch
included, as above); the images/s of updates 6 to `--steps` come from two of those means, and the process is
stopped there (before its end-of-epoch validation).

`--gpu` (run by `scripts/gpu_check.sh`): the same contenders on the first CUDA GPU at 224 px with bf16 autocast and
batch 128 (finetune: `trainer=gpu trainer.precision=bf16-mixed`; timm: `--amp --amp-dtype bfloat16 --pin-mem`),
every loader with finetune's GPU worker count, nvidia-smi sampled every 0.2 s for the GPU's busy share,
utilisation and memory; no 5x set. Then diagnostics, in order of use if the time runs out (`--budget-s`): the plain
loop with one knob at a time (`SCALE_PLAIN`: cuDNN autotuning, timm's PrefetchLoader, the loss read each step, no
per-step wait) and three at once, finetune under Lightning's simple profiler (its report in `--log`), the in-memory
pair, the loader alone, finetune with one setting changed (fp32, NCHW, autotuning off, `data.batch_size=auto`) and
the loader at 2/4/8/12 workers; the further rounds last. `--write` rewrites the CPU run's goal rows and section of
BENCHMARKS.md (from this run, or from `--from` a results file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # render.py, for --write
GPU = os.environ.get("SCALE_GPU") == "1"  # --gpu sets it, so the contenders' child processes see it too
# On a GPU: the backbone's own 224 px, bf16 autocast, batch 128 (batch 32 leaves an H200 idle), as timm trains
BATCH, LR, WEIGHT_DECAY, SIZE, SKIP = (128 if GPU else 32), 1e-3, 0.01, (224 if GPU else 64), 5
SIZES_X5 = (28, 42, 56, 70, 84)
TIMM_SKIPPED = ("not run: timm's train.py is not in the timm wheel or sdist (it lives in the GitHub repository); "
                "give a copy with --timm-train PATH or TIMM_TRAIN_PY=PATH")
TIMM_LOG = re.compile(r"Train: 0 \[\s*(\d+)/\d+.*?\((\d+\.\d+)s,.*Data: [\d.]+ \(([\d.]+)\)")


def make_sets(root: Path, per_class: int, with_many: bool = True) -> tuple[Path, Path]:
    """(the PNG set, the same images at five sizes); written once (the second only ``with_many``)."""
    from PIL import Image

    base = root / ("fmnist-6k" if per_class == 5990 else f"fmnist-{per_class}pc")
    if not (base / "train").is_dir():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(base),
                        "--train-per-class", str(per_class), "--val-per-class", "10", "--test-per-class", "200"],
                       check=True, stdout=subprocess.DEVNULL)
    many = root / f"{base.name}-x5"
    if with_many and not (many / "done").is_file():
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


def run_finetune(root: Path, steps: int, stream: bool, extra: tuple[str, ...] = ()) -> dict:
    """The finetune CLI for `steps` steps (`extra` overrides last); its metrics.json throughput and the wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "finetune", f"data.root={root}", f"run_dir={tmp}/run", "recipe=off", "policy=full",
             f"trainer.max_steps={steps}", "trainer.max_epochs=1", f"data.image_size={SIZE}", "data.crop_pct=1.0",
             "augment=none", "model.channels_last=true", f"data.batch_size={BATCH}", "optimizer=adamw",
             f"optimizer.lr={LR}", f"optimizer.weight_decay={WEIGHT_DECAY}", "report=false",
             "trainer.enable_progress_bar=false", *(["data.preload=false"] if stream else []),
             "calibrate=false", "open_set.fit=false",  # after-fit scoring, not training: ~11 s of each run's wall
             *(["trainer=gpu", "trainer.precision=bf16-mixed"] if GPU else []), *extra],
            capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if os.environ.get("SCALE_LOG"):  # the whole output, for what a row alone does not say (start-up, profiler)
            with open(os.environ["SCALE_LOG"], "a") as out:
                out.write(f"\n===== finetune {' '.join(extra)} (stream={stream}, rc {result.returncode}, "
                          f"{wall:.1f} s)\n{result.stdout}{result.stderr}")
        if result.returncode != 0:
            raise SystemExit(f"finetune failed:\n{result.stderr[-3000:]}")
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    speed = metrics["throughput"]
    workers = next((line.rsplit(":", 1)[1].strip() for line in result.stdout.splitlines() + result.stderr.splitlines()
                    if "loader workers:" in line), "?")
    batch = next((line.split("data.batch_size=auto -> ", 1)[1].split(":", 1)[0] for line in
                  result.stdout.splitlines() + result.stderr.splitlines() if "data.batch_size=auto -> " in line),
                 None)  # data.batch_size=auto's choice, as logged
    return {"images_per_s": speed["train_images_per_s"], "wait_share": speed["loader_wait_share"],
            "peak_rss_gb": speed["peak_rss_gb"], "workers": workers, "wall_s": round(wall, 1),
            **({"batch": int(batch)} if batch else {}),
            **({"peak_gpu_gb": metrics.get("peak_gpu_memory_gb")} if GPU else {})}


# The plain loop's knobs (SCALE_PLAIN, comma-separated; GPU diagnostics of what makes a loop fast there):
# benchmark: cuDNN autotuning on; prefetch: uint8 batches through timm's PrefetchLoader (copied to the device and
# normalised on a side CUDA stream while the current step runs), streaming only; item: read the loss each step
# (timm's loss.item()) instead of synchronising the device; nosync: neither (the device is waited for once, at the end).
PLAIN_KNOBS = ("benchmark", "prefetch", "item", "nosync")


def plain_loop(root: str, steps: int, stream: bool, workers: int) -> dict:
    """The plain loop (runs in a child process: `--plain`), with the knobs SCALE_PLAIN names."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset
    from torchvision import datasets, transforms

    from finetune.conf import preset
    from finetune.data.datamodule import decode_all, decode_side
    from finetune.data.transforms import resolve_preprocessing, train_transform
    from finetune.models.backbone import load_pretrained
    from finetune.throughput import peak_rss_gb

    knobs = {k for k in os.environ.get("SCALE_PLAIN", "").split(",") if k}
    if knobs - set(PLAIN_KNOBS):
        raise SystemExit(f"SCALE_PLAIN: unknown {sorted(knobs - set(PLAIN_KNOBS))}; known: {PLAIN_KNOBS}")
    torch.backends.cudnn.benchmark = "benchmark" in knobs
    prefetch = "prefetch" in knobs and stream
    torch.manual_seed(0)
    model, _, _ = load_pretrained("tf_efficientnet_lite0", "auto")
    model.reset_classifier(10)
    device = torch.device("cuda" if GPU else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    pp = resolve_preprocessing(model, {"image_size": SIZE, "crop_pct": 1.0})
    bicubic = transforms.InterpolationMode.BICUBIC
    to_tensor = transforms.Compose([transforms.Resize((SIZE, SIZE), interpolation=bicubic), transforms.ToTensor(),
                                    transforms.Normalize(pp.mean, pp.std)])
    if stream:
        as_uint8 = transforms.Compose([transforms.Resize((SIZE, SIZE), interpolation=bicubic),
                                       transforms.PILToTensor()])
        dataset = datasets.ImageFolder(str(Path(root) / "train"), transform=transforms.Compose(
            [transforms.Grayscale(3), as_uint8 if prefetch else to_tensor]))
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
                        persistent_workers=workers > 0, pin_memory=GPU)
    if prefetch:
        from timm.data.loader import PrefetchLoader

        loader = PrefetchLoader(loader, pp.mean, pp.std, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=GPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model.train()
    wait = total = 0.0
    timed = 0
    last_end = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        fetched = time.perf_counter()
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(model(x), y.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if "item" in knobs:
            loss.item()  # as timm's loop: the loss read each step
        elif GPU and "nosync" not in knobs:
            torch.cuda.synchronize()  # the step's time, not its launch's
        end = time.perf_counter()
        if step == SKIP:
            first = last_end  # nosync: the timed steps span from here to the device's end of the last one
        if step >= SKIP:
            wait += fetched - last_end
            total += end - last_end
            timed += len(y)
        last_end = end
        if step + 1 >= steps:
            break
    if GPU:
        torch.cuda.synchronize()
    if "nosync" in knobs:
        total = time.perf_counter() - first
    del loader  # the workers end, so their peak is counted
    return {"images_per_s": round(timed / total, 1), "wait_share": round(wait / total, 3),
            "peak_rss_gb": peak_rss_gb(), "workers": workers, **({"knobs": sorted(knobs)} if knobs else {}),
            **({"peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)} if GPU else {})}


def loader_alone(root: str, steps: int, stream: bool, workers: int) -> dict:
    """finetune's own training loader with no model (a child process: `--loader`): the images/s the input pipeline
    can deliver to the device (normalised there, as a run does), to set beside the training images/s."""
    import torch

    from finetune.data.datamodule import ImageDataModule
    from finetune.data.datasets import scan_dataset
    from finetune.data.transforms import Preprocessing
    from finetune.throughput import peak_rss_gb

    pp = Preprocessing(SIZE, (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0)  # tf_efficientnet_lite0's, at SIZE, whole frame
    data = ImageDataModule(scan_dataset(root, 0.0, 0.0, 0), pp, augment=None, batch_size=BATCH, num_workers=workers,
                           preload=False if stream else "auto", seed=0, on_gpu=GPU, normalize_on_device=True)
    data.setup("fit")
    device = torch.device("cuda" if GPU else "cpu")
    timed, started = 0, time.perf_counter()
    for step, (x, y) in enumerate(data.train_dataloader()):
        x, _ = data.on_after_batch_transfer([x.to(device, non_blocking=True), y], 0)  # the hook a run goes through
        if step == SKIP:
            if GPU:
                torch.cuda.synchronize()
            timed, started = 0, time.perf_counter()
        timed += len(x)
        if step + 1 >= steps:
            break
    if GPU:
        torch.cuda.synchronize()
    return {"images_per_s": round(timed / (time.perf_counter() - started), 1), "wait_share": None,
            "peak_rss_gb": peak_rss_gb(), "workers": data.num_workers}


def _child(mode: str, what: str, root: Path, steps: int, stream: bool, workers: int, knobs: str = "") -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, mode, str(root), str(steps), str(int(stream)),
                             str(workers)], capture_output=True, text=True, check=False,
                            env={**os.environ, "SCALE_PLAIN": knobs})
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - started, 1)}


def run_plain(root: Path, steps: int, stream: bool, workers: int, knobs: str = "") -> dict:
    return _child("--plain", "plain loop", root, steps, stream, workers, knobs)


def run_loader(root: Path, steps: int, stream: bool, workers: int) -> dict:
    return _child("--loader", "the loader alone", root, steps, stream, workers)


def timm_checkpoint(out: Path) -> None:
    """finetune's bundled weights with a new 10-class head, as a timm state dict (runs in a child: `--timm-ckpt`)."""
    import torch

    from finetune.models.backbone import load_pretrained

    torch.manual_seed(0)
    model, _, _ = load_pretrained("tf_efficientnet_lite0", "auto")
    model.reset_classifier(10)
    torch.save(model.state_dict(), out)


def _peak_rss_tree_gb(pid: int) -> dict:
    """Peak RSS (VmHWM) of a running process and of its largest child, read from /proc before it is stopped."""
    def hwm(p: str) -> float:
        try:
            line = next(x for x in Path(f"/proc/{p}/status").read_text().splitlines() if x.startswith("VmHWM"))
            return int(line.split()[1]) * 1024 / 1e9
        except (OSError, StopIteration):
            return 0.0
    kids = [k for t in Path(f"/proc/{pid}/task").glob("*/children") for k in t.read_text().split()]
    return {"process": round(hwm(str(pid)), 3), "largest_child": round(max(map(hwm, kids), default=0.0), 3)}


def run_timm_train(script: Path, root: Path, steps: int, workers: int) -> dict:
    """timm's train.py on the same files, stopped after `steps` updates; images/s from its logged mean times."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, cfg = Path(tmp) / "lite0_10.pth", Path(tmp) / "cpu.yaml"
        subprocess.run([sys.executable, __file__, "--timm-ckpt", str(ckpt)], check=True)
        cfg.write_text(f"device: {'cuda' if GPU else 'cpu'}\n")  # no --device flag; its YAML defaults reach args
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(script), "-c", str(cfg), "--data-dir", str(root), "--val-split", "val",
             "--model", "tf_efficientnet_lite0", "--initial-checkpoint", str(ckpt), "--num-classes", "10",
             "--img-size", str(SIZE), "--crop-pct", "1.0", "--no-aug", "-b", str(BATCH), "--opt", "adamw",
             "--lr", str(LR), "--weight-decay", str(WEIGHT_DECAY), "--smoothing", "0", "--channels-last",
             "--workers", str(workers), "--epochs", "1", "--warmup-epochs", "0", "--log-interval", str(SKIP),
             "--output", tmp, *(["--amp", "--amp-dtype", "bfloat16", "--pin-mem"] if GPU else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        means: dict[int, tuple[float, float]] = {}  # update -> (mean update time, mean wait for data)
        tail: list[str] = []
        for line in proc.stdout:
            tail = (tail + [line])[-20:]
            if (hit := TIMM_LOG.search(line)):
                means[int(hit[1])] = (float(hit[2]), float(hit[3]))
                if int(hit[1]) >= steps:
                    break
        rss = _peak_rss_tree_gb(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)  # its loader workers too
        proc.wait()
        wall = time.perf_counter() - started
    last = max(means, default=0)
    if last < steps or SKIP not in means:
        raise SystemExit(f"timm's train.py stopped before update {steps}:\n{''.join(tail)}")
    # the mean of updates 0..k times (k + 1) is their total; the difference is updates SKIP+1..last
    seconds, waited = (means[last][i] * (last + 1) - means[SKIP][i] * (SKIP + 1) for i in (0, 1))
    return {"images_per_s": round(BATCH * (last - SKIP) / seconds, 1), "wait_share": round(waited / seconds, 3),
            "peak_rss_gb": rss, "workers": workers, "wall_s": round(wall, 1)}


def _timm_note(timm_train: Path | None) -> str:
    if not timm_train:
        return TIMM_SKIPPED
    digest = hashlib.sha256(timm_train.read_bytes()).hexdigest()[:12]
    return f"run from a given copy ({timm_train.name}, sha256 {digest})"


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


NVIDIA_SMI = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0"]


class GpuSampler:
    """On a GPU run: nvidia-smi's utilisation and memory in use, every 0.2 s while a contender runs (its start-up
    included, so the mean understates the training steps' share; the peak memory is exact enough)."""

    def __init__(self):
        self.util: list[float] = []
        self.memory: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            out = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, check=False).stdout.split(",")
            if len(out) == 2:
                self.util.append(float(out[0]))
                self.memory.append(float(out[1]) / 1024)

    def __enter__(self):
        if GPU:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict:
        """The mean utilisation of the samples above 0% (the start-up before the first step is not the GPU's
        share of training), the share of samples above 0%, and the most memory in use (GiB)."""
        if not self.util:
            return {}
        busy = [u for u in self.util if u > 0]
        return {"gpu_util_mean_busy": round(sum(busy) / len(busy), 1) if busy else 0.0,
                "gpu_busy_samples": round(len(busy) / len(self.util), 3),
                "gpu_memory_max_gb": round(max(self.memory), 2)}


def _commit() -> str:
    """HEAD's short hash, with +changes when the working tree differs from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], check=False, cwd=REPO, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                                                  else "")


def _fastest_rounds(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each contender's fastest round (interference on a shared machine only ever slows a run), with every round's
    images/s; contenders with no round left out."""
    return {name: {**max(done, key=lambda d: d["images_per_s"]),
                   "rounds_images_per_s": [d["images_per_s"] for d in done]} for name, done in runs.items() if done}


def _ratios(rows: dict) -> dict:
    """finetune against the loop in memory and streaming, and against timm's script streaming (like for like: both
    decode every file) and as each runs by default; only the pairs whose two rows are there."""
    pairs = {"ratio_in_memory": (IN_MEMORY, PLAIN_IN_MEMORY), "ratio_streaming": (STREAMED, PLAIN_STREAMED),
             "ratio_timm": (STREAMED, TIMM_STREAMED), "ratio_timm_default": (IN_MEMORY, TIMM_STREAMED)}
    return {key: _ratio(rows, a, b) for key, (a, b) in pairs.items() if a in rows and b in rows}


def _ratio(rows: dict, ours: str, theirs: str) -> dict:
    """finetune / the other's images/s: of the fastest rounds, of the medians, and paired by round (the rounds
    alternate, so a round's two runs shared the machine's state): the mean of the per-round ratios and its
    standard error (None with one round)."""
    import statistics

    mine, other = rows[ours]["rounds_images_per_s"], rows[theirs]["rounds_images_per_s"]
    if not all(mine) or not all(other):  # a failed round (the GPU run keeps going): no ratio
        return {"fastest": None, "median": None, "paired": None, "paired_se": None}
    paired = [a / b for a, b in zip(mine, other)]
    se = statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else None
    return {"fastest": round(max(mine) / max(other), 3),
            "median": round(statistics.median(mine) / statistics.median(other), 3),
            "paired": round(statistics.mean(paired), 3), "paired_se": None if se is None else round(se, 3)}


STREAMED = "finetune, streaming"
PLAIN_STREAMED = "plain loop, streaming (ImageFolder)"
IN_MEMORY, PLAIN_IN_MEMORY = "finetune, in memory", "plain loop, in memory"
TIMM_STREAMED = "timm train.py, streaming (its prefetching loader)"
LOADER_IN_MEMORY = "finetune's loader alone (no model), in memory"
LOADER_STREAMED = "finetune's loader alone (no model), streaming"


def measure(data: Path, quick: bool = False, steps: int | None = None, rounds: int = 3, log=print,
            timm_train: Path | None = None, budget_s: float = 0.0) -> dict:
    """Every contender, `rounds` alternating rounds of the two pairs, then the 5x set once (the suite's entry)."""
    steps = steps or (40 if quick else 150)
    base, many = make_sets(data, 600 if quick else 5990, with_many=not GPU)  # the memory check is the CPU run's
    # finetune's num_workers=auto: on a CPU up to 4 for streamed files and 0 in memory; on a GPU up to 8 either way
    workers = min(8 if GPU else 4, max(1, (os.cpu_count() or 2) - 1))
    pairs = [
        (IN_MEMORY, lambda: run_finetune(base, steps, stream=False)),
        (PLAIN_IN_MEMORY, lambda: run_plain(base, steps, stream=False, workers=workers if GPU else 0)),
        (STREAMED, lambda: run_finetune(base, steps, stream=True)),
        (PLAIN_STREAMED, lambda: run_plain(base, steps, stream=True, workers=workers)),
    ]
    timm_train = timm_train or (Path(os.environ["TIMM_TRAIN_PY"]) if os.environ.get("TIMM_TRAIN_PY") else None)
    if timm_train:
        pairs.append((TIMM_STREAMED, lambda: run_timm_train(timm_train, base, steps, workers)))
    if GPU:
        return measure_gpu(base, steps, rounds, workers, pairs, timm_train, log, budget_s)
    runs: dict[str, list[dict]] = {name: [] for name, _ in pairs}
    for r in range(rounds):  # alternating, so a slow spell of the shared machine hits both sides
        for name, run in pairs:
            runs[name].append(run())
            log(f"scale round {r + 1}, {name}: {runs[name][-1]['images_per_s']} images/s")
    rows = _fastest_rounds(runs)
    # What the input pipeline alone delivers (no model), once each: above the training images/s, it is not the limit
    for name, stream in ((LOADER_IN_MEMORY, False), (LOADER_STREAMED, True)):
        rows[name] = run_loader(base, max(steps, 3 * SKIP), stream, workers if stream else 0)
        log(f"scale {name}: {rows[name]['images_per_s']} images/s")
    train_files = sum(1 for _ in (base / "train").rglob("*.png"))
    rows[f"{STREAMED}, {many.name}"] = run_finetune(many, steps, stream=True)
    log(f"scale {many.name}: {rows[f'{STREAMED}, {many.name}']}")
    return {
        "set": base.name, "many_set": many.name, "train_files": train_files,
        "many_files": train_files * len(SIZES_X5), "steps": steps, "batch": BATCH, "image_size": SIZE,
        "cpus": os.cpu_count(), "rounds": rounds, "rows": rows,
        "timm_train": _timm_note(timm_train), **_ratios(rows),
        "rss_many_over_base": round(rows[f"{STREAMED}, {many.name}"]["peak_rss_gb"]["process"]
                                    / rows[STREAMED]["peak_rss_gb"]["process"], 3),
    }


# The GPU run's one-off rows: finetune in memory with one setting changed (each measured against the default), then
# the loader alone at several worker counts (the data.num_workers=auto rule). name -> overrides.
GPU_VARIANTS = {
    "finetune, in memory, fp32 (trainer.precision=32-true)": ("trainer.precision=32-true",),
    "finetune, in memory, NCHW (model.channels_last=false)": ("model.channels_last=false",),
    "finetune, in memory, cuDNN autotuning off (trainer.benchmark=false)": ("trainer.benchmark=false",),
    # lr_scaling=none: 50 steps measure speed; how the LR should follow a batch of up to 1024 is a question of accuracy
    "finetune, in memory, data.batch_size=auto": ("data.batch_size=auto", "lr_scaling=none"),
}
GPU_WORKER_COUNTS = (2, 4, 8, 12)


# GPU diagnostics of what a fast loop does there (the plain loop, streaming, one knob at a time, then three at once),
# and finetune with Lightning's per-hook timings (the report is in --log).
GPU_PLAIN_KNOBS = {
    "plain loop, streaming, + cuDNN autotuning": "benchmark",
    "plain loop, streaming, + timm's PrefetchLoader (uint8, side stream)": "prefetch",
    "plain loop, streaming, loss read each step instead of a device sync": "item",
    "plain loop, streaming, no per-step wait": "nosync",
    "plain loop, streaming, + autotuning, PrefetchLoader, no per-step wait": "benchmark,prefetch,nosync",
}
GPU_PROFILED = "finetune, streaming, Lightning's simple profiler (trainer.profiler=simple)"


def measure_gpu(base: Path, steps: int, rounds: int, workers: int, pairs: list, timm_train: Path | None,
                log=print, budget_s: float = 0.0) -> dict:
    """The GPU run, in order of what matters if time runs out (each row is logged as it lands; past ``budget_s``
    seconds, when given, the rows not started are listed as skipped): one round of the streaming contenders
    (finetune, timm, the plain loop), the plain loop's knobs, finetune profiled, the in-memory pair, the loader
    alone, the one-setting variants, the worker counts, then the further rounds."""
    runs: dict[str, list[dict]] = {name: [] for name, _ in pairs}
    extra: dict[str, dict] = {}
    skipped: list[str] = []
    started = time.monotonic()

    def timed(name: str, run, *args) -> dict | None:
        if budget_s and time.monotonic() - started > budget_s:
            skipped.append(name)
            return None
        with GpuSampler() as gpu:
            try:
                row = run(*args)
            except SystemExit as failed:  # one row's failure is reported, the others still run
                row = {"images_per_s": 0.0, "wait_share": None, "workers": "?", "error": str(failed)[-1500:]}
        row |= gpu.summary()
        log(f"ROW {json.dumps({'name': name, **row})}")
        return row

    def round_of(names: tuple[str, ...]) -> None:
        for name, run in pairs:
            if name in names and (row := timed(name, run)) is not None:
                runs[name].append(row)

    def one_off(name: str, run, *args) -> None:
        if (row := timed(name, run, *args)) is not None:
            extra[name] = row

    streaming, in_memory = (STREAMED, TIMM_STREAMED, PLAIN_STREAMED), (IN_MEMORY, PLAIN_IN_MEMORY)
    round_of(streaming)
    for name, knobs in GPU_PLAIN_KNOBS.items():
        one_off(name, run_plain, base, steps, True, workers, knobs)
    one_off(GPU_PROFILED, run_finetune, base, steps, True, ("trainer.profiler=simple",))
    round_of(in_memory)
    for name, stream in ((LOADER_IN_MEMORY, False), (LOADER_STREAMED, True)):
        one_off(name, run_loader, base, max(steps, 3 * SKIP), stream, workers)
    for name, overrides in GPU_VARIANTS.items():
        auto = "data.batch_size=auto" in overrides  # larger batches: fewer steps see as many images
        one_off(name, run_finetune, base, max(3 * SKIP, steps // 4) if auto else steps, False, overrides)
    for n in GPU_WORKER_COUNTS:
        one_off(f"{LOADER_STREAMED}, {n} workers", run_loader, base, max(steps, 3 * SKIP), True, n)
    for _ in range(rounds - 1):
        round_of(streaming + in_memory)
    rows = _fastest_rounds(runs) | extra
    return {"set": base.name, "train_files": sum(1 for _ in (base / "train").rglob("*.png")), "steps": steps,
            "batch": BATCH, "image_size": SIZE, "precision": "bf16", "cpus": os.cpu_count(), "rounds": rounds,
            "rows": rows, "skipped": skipped, "gpu": _gpu_name(), "timm_train": _timm_note(timm_train),
            **_ratios(rows)}


def gpu_table(result: dict) -> list[str]:
    """The GPU run as a markdown table (printed; BENCHMARKS.md's GPU section is written by hand from it)."""
    import render

    out = [(f"{result['gpu']}, {result['image_size']} px, bf16, batch {result['batch']}, {result['steps']} steps, "
           f"{result['cpus']} cores; timm's train.py: {result['timm_train']}"), "",
           ("| contender | batch | loader workers | training images/s | waiting for data | GPU busy (samples) | "
            "GPU util when busy | GPU memory max GB |"), "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        shown = f"{r['images_per_s']:g}" if "error" not in r else f"failed: {r['error'][-200:]!r}"
        out.append(f"| {name} | {r.get('batch', result['batch'])} | {r['workers']} | {shown} | "
                   f"{render.share(r['wait_share'])} | {100 * r.get('gpu_busy_samples', 0):.0f}% | "
                   f"{r.get('gpu_util_mean_busy', '?')}% | {r.get('gpu_memory_max_gb', '?')} |")
    ratios = [f"{k}: {v['fastest']:.2f}x (paired {v['paired']:.2f}x)" if v["fastest"] else f"{k}: failed"
              for k, v in result.items() if k.startswith("ratio_")]
    default = result["rows"].get(IN_MEMORY, {}).get("images_per_s")
    variants = [f"{name.split(', ', 2)[-1]}: {result['rows'][name]['images_per_s'] / default:.2f}x"
                for name in GPU_VARIANTS if name in result["rows"] and default]
    plain = result["rows"].get(PLAIN_STREAMED, {}).get("images_per_s")
    knobs = [f"{name.split(', ', 2)[-1]}: {result['rows'][name]['images_per_s'] / plain:.2f}x"
             for name in GPU_PLAIN_KNOBS if name in result["rows"] and plain]
    return [*out, "", "finetune / other: " + ", ".join(ratios), "",
            "one setting changed / finetune's default in memory: " + ", ".join(variants), "",
            "the plain loop with a knob / without: " + ", ".join(knobs), "",
            "skipped (time budget): " + (", ".join(result.get("skipped") or []) or "none")]


def write_benchmarks(result: dict, path: Path) -> None:
    """Rewrite the two goal rows and the large-data section of BENCHMARKS.md's generated part from ``result``
    (what suite.py renders after a full run), leaving the rest as it is."""
    import render

    text = path.read_text()
    goals = render.scale_goals(result)
    lines = text.split("\n")
    for new in goals:
        prefix = new.split(":", 1)[0] + ":"
        at = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
        if at is None:
            raise SystemExit(f"{path} has no goal row starting {prefix!r}")
        lines[at] = new
    text = "\n".join(lines)
    head, rest = text.split(render.SCALE_FROM, 1)
    tail = rest.split("\n## ", 1)[1]
    path.write_text(head + "\n" + "\n".join(render.scale_section(result)).rstrip("\n") + "\n\n## " + tail)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--plain", "--loader"):
        _, mode, root, steps, stream, workers = sys.argv
        child = plain_loop if mode == "--plain" else loader_alone
        print(json.dumps(child(root, int(steps), bool(int(stream)), int(workers))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--timm-ckpt":
        timm_checkpoint(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="600 images per class, 40 steps")
    parser.add_argument("--gpu", action="store_true", help="on the first CUDA GPU: 224 px, bf16, batch 128, GPU "
                        "utilisation and memory (scripts/gpu_check.sh runs it); no 5x memory set")
    parser.add_argument("--steps", type=int, help="training steps per contender (default 150; --quick 40)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each pair (default 3)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bench")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget-s", type=float, default=0.0, help="--gpu: start no row after this many seconds "
                        "(the results so far are still written); 0: no limit")
    parser.add_argument("--log", type=Path, help="append every finetune contender's output (log, profiler) here")
    parser.add_argument("--timm-train", type=Path, help="a copy of timm's train.py to compare (or TIMM_TRAIN_PY)")
    parser.add_argument("--write", action="store_true", help="rewrite the large-data rows and section of "
                        "BENCHMARKS.md from this run (or from --from)")
    parser.add_argument("--from", dest="source", type=Path, help="a results file of an earlier run (with --write)")
    args = parser.parse_args()
    if args.gpu and not GPU:  # the settings are read at import, in this process and in every contender's
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "SCALE_GPU": "1"})
    if args.source:
        result = json.loads(args.source.read_text())
    else:
        if args.log:
            os.environ["SCALE_LOG"] = str(args.log)
        result = measure(args.data, args.quick, args.steps, args.rounds, timm_train=args.timm_train,
                         budget_s=args.budget_s)
        result |= {"date": time.strftime("%Y-%m-%d"), "commit": _commit()}
        print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if "gpu" in result:
        print("\n".join(gpu_table(result)))
    if args.write:
        if "gpu" in result:
            raise SystemExit("--write takes the CPU run; put the GPU table above into BENCHMARKS.md's GPU section")
        write_benchmarks(result, REPO / "BENCHMARKS.md")


if __name__ == "__main__":
    sys.exit(main())
