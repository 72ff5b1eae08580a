"""finetune from Python (a notebook, a script): the CLI's pipeline called as functions, not a second one.

    import finetune
    run = finetune.fit("path/to/images")                        # = `finetune data.root=path/to/images`
    run = finetune.fit("imgs", policy="linear_probe", optimizer={"lr": 3e-3}, seed=1)
    run = finetune.fit((images, labels))                        # PIL images or uint8 arrays in memory
    model = finetune.load(run.dir)                              # or a checkpoint file
    model.predict(["a.jpg", pil_image, array], topk=3)          # DataFrame (pandas) or a list of dicts
    model.evaluate("path/to/labelled/folder"); model.features(images); model.export("hf", "my-model")
    finetune.advise("path/to/images")                           # the measured decision, no training

Overrides are the CLI's keys, as keyword arguments (``policy="full"``, ``optimizer={"lr": 3e-3}``,
``**{"optimizer.lr": 3e-3}``) or as the CLI's strings (``overrides=["optimizer.lr=3e-3"]``); they are composed
by Hydra and checked exactly as on the command line, so a mistake raises the CLI's :class:`FinetuneError`.
Each call composes its own config and leaves no global Hydra state, no logging handler and no working
directory change behind; the seed makes two calls in one process give the same result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from finetune.errors import FinetuneError

__all__ = ["Model", "Run", "advise", "fit", "load"]

_PLAIN = re.compile(r"^[A-Za-z0-9_./:@+-]*$")  # values Hydra's override grammar takes unquoted


# --------------------------------------------------------------------------------------------- overrides
def _value(value: Any, key: str) -> str:
    """A Python value as a Hydra override value (quoted where the grammar needs it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        if value and _PLAIN.match(value) and not value[0].isdigit():
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v, key) for v in value) + "]"
    raise FinetuneError(f"{key}: a {type(value).__name__} cannot be a config value; pass a number, a string, a "
                        f"bool, None, a list, or a dict of them (e.g. optimizer={{'lr': 3e-3}}).")


def _flatten(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in options.items():
        if not isinstance(key, str) or not key:
            raise FinetuneError(f"override key {key!r} is not a config key; keys are names such as 'optimizer.lr'.")
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flatten(value, full + ".")
        else:
            out.append(f"{full}={_value(value, full)}")
    return out


def to_overrides(options: Mapping[str, Any], overrides: Sequence[str] = ()) -> list[str]:
    """Keyword options and CLI strings as one override list (the strings last, as typed)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise FinetuneError(f"overrides: {bad[0]!r} is not a string; write them as on the command line, e.g. "
                            f"overrides=['optimizer.lr=3e-3'].")
    return [*_flatten(options), *overrides]


@contextlib.contextmanager
def _composed(config_name: str, overrides: list[str]) -> Iterator[Any]:
    """The config the CLI would run with these overrides, and Hydra's record of what was typed (recipe=auto keeps
    typed keys), for the duration of the call only: the global Hydra instance is cleared afterwards."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    from finetune.cli.main import _hydra_error_message

    with initialize_config_module("finetune.conf", version_base="1.3"):
        try:
            HydraConfig.instance().set_config(compose(config_name, overrides=overrides, return_hydra_config=True))
            cfg = compose(config_name, overrides=overrides)
        except (CompactHydraException, OmegaConfBaseException) as e:
            raise FinetuneError(_hydra_error_message(e)) from None
        try:
            yield cfg
        finally:
            HydraConfig.instance().cfg = None


@contextlib.contextmanager
def _logging_to(run_dir: Path | None) -> Iterator[None]:
    """finetune's log lines (the policy and recipe blocks, the result) on the console and in RUN/fit.log, as
    the CLI shows them; the handlers go again when the call ends, so repeated calls do not print twice."""
    from finetune.cli.main import _load_lightning, _quiet_library_logging

    _quiet_library_logging()
    _load_lightning()
    logger = logging.getLogger("finetune")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "fit.log"))
    level = logger.level
    for handler in handlers:
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------------- data
def _as_array(image: Any, where: str) -> np.ndarray:
    """A PIL image or an array as HxWx3 uint8 RGB."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise FinetuneError(f"{where} is a {image.dtype} array; images in memory are uint8 (0..255): convert "
                                f"with (array * 255).clip(0, 255).astype('uint8') if it is 0..1.")
        if image.ndim == 2:
            return np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] in (1, 3, 4):
            return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
        raise FinetuneError(f"{where} has shape {image.shape}; an image array is HxW (grayscale) or HxWx3 (RGB).")
    raise FinetuneError(f"{where} is a {type(image).__name__}; pass a PIL image, a uint8 array or an image path.")


def _image_items(images: Any) -> list[Any]:
    """What predict / features take, as a list of single images: one path, PIL image or array; a list of them;
    or one uint8 batch array, N x H x W x C or N x H x W (the layouts fit((images, labels)) takes, e.g. X_test)."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        if images.ndim == 3 and images.shape[2] not in (1, 3, 4):  # not H x W x C
            if images.shape[0] in (1, 3):
                raise FinetuneError(
                    f"images has shape {images.shape}: one channels-first image (torch's C x H x W) or "
                    f"{images.shape[0]} grayscale images? Pass np.moveaxis(images, 0, -1) for the image (H x W x C), "
                    f"or list(images) for the grayscale images.")
            return list(images)  # N grayscale H x W images
        return [images]
    if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def _write_in_memory(data: tuple, folder: Path, min_classes: int = 1) -> Path:
    """``(images, labels)`` written as ``folder/<label>/NNNNN.png``, so training reads files like any folder (and
    the run can be resumed or repeated from them). One channel layout and one image size for all, or an error."""
    from PIL import Image

    if len(data) != 2:
        raise FinetuneError(f"data is a tuple of {len(data)} items; in-memory data is (images, labels).")
    images, labels = data
    images, labels = list(images), list(labels)
    if len(images) != len(labels):
        raise FinetuneError(f"data: {len(images)} images but {len(labels)} labels; give one label per image.")
    if not images:
        raise FinetuneError("data: no images given.")
    arrays = [_as_array(im, f"data images[{i}]") for i, im in enumerate(images)]
    channels = {np.asarray(images[i]).shape[2:] if isinstance(images[i], np.ndarray) else "PIL"
                for i in range(len(images))}
    if len(channels) > 1:
        raise FinetuneError(f"data: the images mix channel layouts ({', '.join(sorted(map(str, channels)))}); give "
                            f"all of them as HxW grayscale or all as HxWx3 RGB (or all as PIL images).")
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first, other = arrays[0].shape[:2], next(s for s in sizes if s != arrays[0].shape[:2])
        i = next(k for k, a in enumerate(arrays) if a.shape[:2] == other)
        raise FinetuneError(f"data: images[0] is {first[0]}x{first[1]} but images[{i}] is {other[0]}x{other[1]}; "
                            f"in-memory images must share one size (resize them first), or write them to class "
                            f"folders and pass the folder.")
    names = [str(label) for label in labels]
    if len(set(names)) < min_classes:  # fit: a classifier needs 2 (evaluate may score one class's images)
        raise FinetuneError(f"data: every label is {names[0]!r}: a classifier needs at least {min_classes} classes; "
                            f"give the images of each class their own label.")
    bad = [n for n in names if not n or n in (".", "..") or "/" in n or "\\" in n]
    if bad:
        raise FinetuneError(f"data: label {bad[0]!r} cannot name a class folder; use labels without slashes.")
    for i, (array, name) in enumerate(zip(arrays, names)):
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(target / f"{i:05d}.png")
    return folder


def _new_run_dir(run_dir: Any) -> Path:
    """The run folder: as given, else outputs/<date>/<time> like the CLI (microseconds: two calls in a second)."""
    if run_dir:
        return Path(str(run_dir)).expanduser()
    return Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")


# -------------------------------------------------------------------------------------------------- fit
@dataclass
class Run:
    """A finished training run: its folder and what it wrote there."""

    dir: Path
    metrics: dict[str, Any]

    @property
    def policy(self) -> dict[str, Any]:
        """policy.json: the decision (cell, policy) and the measurements behind it."""
        return json.loads((self.dir / "policy.json").read_text())

    @property
    def best(self) -> Path | None:
        """The best checkpoint by validation accuracy (None when there was no validation split)."""
        best = self.metrics.get("best_checkpoint")
        return Path(best) if best else None

    @property
    def scored(self) -> Path | None:
        """The checkpoint the metrics were computed with (``score_checkpoint``: best or last)."""
        scored = self.metrics.get("scored_checkpoint")
        return Path(scored) if scored else None

    def report(self) -> Path:
        """The self-contained HTML report (report=true, the default)."""
        path = self.dir / "report.html"
        if not path.is_file():
            raise FinetuneError(f"{self.dir} has no report.html: the run was made with report=false.")
        return path

    def model(self) -> Model:
        """The scored model, ready to predict."""
        return load(self.dir)


def _check_strategy_in_notebook(strategy: Any) -> None:
    """DDP starts the script once per process, which a notebook cannot be: ddp_spawn (or one process) there."""
    import sys

    name = str(strategy)
    if "ipykernel" in sys.modules and name.startswith("ddp") and "spawn" not in name and "notebook" not in name:
        raise FinetuneError(f"trainer.strategy={name} starts this program again for every process, which a notebook "
                            f"cannot do: use trainer.strategy=ddp_spawn (or ddp_notebook) for several GPUs from a "
                            f"notebook, or run the same overrides with the `finetune` command.")


def fit(data: Any, /, overrides: Sequence[str] = (), **options: Any) -> Run:
    """Train on ``data`` (a folder, a CSV, or ``(images, labels)`` in memory) as ``finetune data.root=DATA
    OVERRIDES`` would, and return the run. ``run_dir=`` names the folder (default outputs/<date>/<time>)."""
    from omegaconf import OmegaConf

    from finetune.config_checks import check_data_root, check_run_dir_outside_data, check_train_config

    if not isinstance(data, (str, Path, tuple)):
        raise FinetuneError(f"data is a {type(data).__name__}; pass a folder or CSV path, or (images, labels).")
    run_dir = _new_run_dir(options.pop("run_dir", None))
    given = to_overrides(options, overrides)
    if any(o.split("=", 1)[0].lstrip("+~") == "data.root" for o in given):
        raise FinetuneError("data.root: pass the data as fit's first argument, not as an override.")
    from finetune.run_folder import IN_MEMORY_IMAGES

    in_memory = run_dir / IN_MEMORY_IMAGES
    root = str(in_memory) if isinstance(data, tuple) else str(data)
    if not isinstance(data, tuple):
        check_run_dir_outside_data(run_dir, root)
    first = [f"data.root={_value(root, 'data')}", f"run_dir={_value(str(run_dir), 'run_dir')}"]
    with _composed("train", [*first, *given]) as cfg:
        if not cfg.resume:
            check_train_config(cfg)  # a bad config fails before anything is written
        _check_strategy_in_notebook(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
        if isinstance(data, tuple):
            from finetune.run_folder import earlier_run_files

            found = earlier_run_files(run_dir)
            if found:  # checked before the images go into it (train checks the folder again)
                raise FinetuneError(f"run_dir={run_dir} already holds files of an earlier run ({', '.join(found[:6])});"
                                    f" pass another run_dir, or leave it unset for a fresh outputs/<date>/<time>.")
            if in_memory.is_dir():  # left by a fit that failed before training: its classes must not mix in
                import shutil

                shutil.rmtree(in_memory)
            _write_in_memory(data, in_memory, min_classes=2)
        if not cfg.resume:
            check_data_root(OmegaConf.select(cfg, "data.root", throw_on_missing=False))
        with _logging_to(run_dir):
            from finetune.train import train

            metrics = train(cfg)
    return Run(Path(metrics["run_dir"]), metrics)


def advise(data: Any, /, overrides: Sequence[str] = (), **options: Any) -> dict[str, Any]:
    """Measure ``data`` and return the decision (the cell, the policy, the evidence, recipe=auto's choices)
    that ``fit`` would apply, without training (``finetune-advise``)."""
    if isinstance(data, tuple):
        raise FinetuneError("advise reads data from a folder or CSV; for images in memory, fit writes them to "
                            "RUN/images (or write them to class folders yourself) and advise on that folder.")
    given = to_overrides(options, overrides)
    with _logging_to(None), _composed("train", [f"data.root={_value(str(data), 'data')}", *given]) as cfg:
        from finetune.advice import advise as run_advise
        from finetune.cli.main import _check_train_start

        _check_train_start(cfg)
        return run_advise(cfg)


# ------------------------------------------------------------------------------------------------ model
def _as_frame(rows: list[dict[str, Any]], as_frame: bool | None) -> Any:
    """``rows`` as a pandas DataFrame (as_frame=True, or None when pandas is installed), else as they are."""
    if as_frame is None:
        try:
            import pandas  # noqa: F401
        except ImportError:
            as_frame = False
        else:
            as_frame = True
    if as_frame:
        try:
            import pandas as pd
        except ImportError:
            raise FinetuneError("predict(as_frame=True) needs pandas: `pip install pandas` (or as_frame=False "
                                "for a list of dicts).") from None

        return pd.DataFrame(rows)
    return rows


@dataclass
class Model:
    """A trained classifier loaded from a checkpoint (or a run folder's scored checkpoint)."""

    path: str
    classes: list[str]
    _loaded: Any = field(repr=False)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self._loaded.preprocessing.to_dict()

    def _batches(self, images: Any, batch_size: int) -> Iterator[tuple[list[str], Any, list[str]]]:
        """(names, normalised tensor batch, errors) for paths, a folder, PIL images or arrays."""
        import torch

        from finetune.data.datamodule import decode_side
        from finetune.data.datasets import scan_inputs
        from finetune.data.images import BadImageError, load_image
        from finetune.data.transforms import eval_transform

        pp = self._loaded.preprocessing
        transform = eval_transform(pp)
        items = _image_items(images)
        entries: list[tuple[str, Any]] = []
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                entries += [(p, p) for p in scan_inputs(item, key="images")]
            else:
                entries.append((f"<image {i}>", _as_array(item, f"images[{i}]")))
        if not entries:
            raise FinetuneError("images: nothing to predict on (an empty list or folder).")
        for start in range(0, len(entries), batch_size):
            names, tensors, errors = [], [], []
            for name, item in entries[start:start + batch_size]:
                try:
                    array = load_image(item, decode_side(pp)) if isinstance(item, str) else item
                    tensors.append(transform(image=array)["image"]), errors.append("")
                except BadImageError as e:
                    tensors.append(torch.zeros(3, pp.image_size, pp.image_size)), errors.append(str(e))
                names.append(name)
            yield names, torch.stack(tensors), errors

    def probabilities(self, images: Any, batch_size: int = 64) -> tuple[list[str], np.ndarray, list[str]]:
        """(names, softmax probabilities [N, classes], calibrated when the run fitted a temperature, errors: ''
        for a readable image)."""
        names, probs, _, errors = self._outputs(images, batch_size, known=False)
        return names, probs, errors

    def known_scores(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """The open-set score per image (higher: more like the training classes; finetune/open_set.py), as
        ``predict(unknown=...)`` compares it with the checkpoint's threshold."""
        from finetune.open_set import unknown_setup

        unknown_setup("auto", [self._loaded], [], "known_scores()")  # multi-label or no threshold: says why
        return self._outputs(images, batch_size, known=True)[2]

    def _outputs(self, images: Any, batch_size: int, known: bool) -> tuple[list[str], np.ndarray, Any, list[str]]:
        """(names, calibrated probabilities, open-set scores or None, errors) in one pass."""
        import torch

        from finetune.open_set import known_scores, logits_and_features

        module, temperature, record = self._loaded.module.eval(), self._loaded.temperature, self._loaded.open_set
        names, probs, scores, errors = [], [], [], []
        with torch.inference_mode():
            for batch_names, batch, batch_errors in self._batches(images, batch_size):
                if known:  # one pass gives the features the score needs and the logits
                    logits, features = logits_and_features(module.net, batch)
                else:
                    logits = module(batch)
                probs.append(logits.sigmoid().numpy() if module.multilabel else
                             (logits / temperature).softmax(-1).numpy())
                if known:
                    scores.append(known_scores(record["score"], logits, features, temperature,
                                               record.get("bank")).numpy())
                names += batch_names
                errors += batch_errors
        return names, np.concatenate(probs), np.concatenate(scores) if known else None, errors

    def predict(self, images: Any, topk: int = 1, as_frame: bool | None = None, batch_size: int = 64,
                unknown: Any = "off") -> Any:
        """Top-k labels and probabilities per image (``images``: paths, a folder, PIL images, arrays, or one
        N x H x W x C / N x H x W uint8 batch array): a pandas DataFrame (when pandas is installed, or
        ``as_frame=True``) or a list of dicts; columns as finetune-predict's CSV (path, label, probability,
        label_i/prob_i, error; multi-label: labels and probabilities of every class at or above its threshold). An
        unreadable file gets an empty label and its error. ``unknown``: off, auto or a share P, as finetune-predict's:
        images below the open-set threshold get the label ``unknown`` (and a ``known_score`` column)."""
        from finetune.open_set import UNKNOWN_LABEL, unknown_setup

        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise FinetuneError(f"topk={topk!r} must be a positive integer.")
        rejection = unknown_setup(unknown, [self._loaded], [])
        names, probs, scores, errors = self._outputs(images, batch_size, known=rejection is not None)
        k = min(topk, len(self.classes))
        if self._loaded.multilabel:  # finetune-predict's multi-label columns: every class above its threshold
            import torch

            from finetune.inference import multilabel_records

            return _as_frame(multilabel_records(torch.from_numpy(probs), names,
                                                {n: e for n, e in zip(names, errors) if e}, self.classes,
                                                self._loaded.thresholds, k), as_frame)
        rows = []
        for i, (name, p, error) in enumerate(zip(names, probs, errors)):
            order = np.argsort(-p)[:k]
            row: dict[str, Any] = {"path": name, "label": "" if error else self.classes[order[0]],
                                   "probability": None if error else float(p[order[0]])}
            for rank, c in enumerate(order, 1):
                row[f"label_{rank}"], row[f"prob_{rank}"] = (("", None) if error else (self.classes[c], float(p[c])))
            if rejection is not None:
                row["known_score"] = None if error else float(scores[i])
                if not error and scores[i] < rejection[0]:
                    row["label"] = UNKNOWN_LABEL
            row["error"] = error
            rows.append(row)
        return _as_frame(rows, as_frame)

    def evaluate(self, data: Any, split: str = "auto", batch_size: int = 64) -> dict[str, Any]:
        """Accuracy and loss on a labelled folder or CSV (its test split, else val, else all images), or on
        ``(images, labels)`` in memory as fit takes them, as finetune-eval computes them (no file kept)."""
        if isinstance(data, tuple):  # written to a temporary class-folder tree, the layout fit writes them in
            import tempfile

            with tempfile.TemporaryDirectory(prefix="finetune-evaluate-") as tmp:
                try:
                    return self.evaluate(_write_in_memory(data, Path(tmp)), split, batch_size)
                except FinetuneError as e:  # about the labels given, not a folder the user never saw
                    raise FinetuneError(str(e).replace(f"data.root={tmp}", "data (in memory)")) from None
        if not isinstance(data, (str, Path)):
            raise FinetuneError(f"data is a {type(data).__name__}; pass a labelled folder or CSV path, or "
                                f"(images, labels).")
        from finetune.data.datasets import scan_dataset
        from finetune.inference import _split_samples, _split_to_score
        from finetune.members import device_for, member_probabilities, score_probabilities

        index = scan_dataset(data, val_fraction=0.0, test_fraction=0.0, min_classes=1,
                             task=self._loaded.module.recipe.task)
        chosen = _split_to_score(index, split)
        samples = _split_samples(index, chosen, self.classes, data)
        probs = member_probabilities([self._loaded], samples, [], batch_size, device_for("cpu"))
        scores = score_probabilities(probs, [label for _, label in samples], self._loaded.thresholds, self.classes)
        return {"split": "all" if index.layout == "class_folders" else chosen, "images": len(samples), **scores}

    def features(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """Embeddings [N, D]: the trained network's pooled features before the classifier (for retrieval,
        clustering, a new head)."""
        import torch

        from finetune.open_set import logits_and_features

        net = self._loaded.module.net.eval()
        out = []
        with torch.inference_mode():
            for _, batch, errors in self._batches(images, batch_size):
                if any(errors):
                    raise FinetuneError(f"images: cannot read {next(e for e in errors if e)}.")
                out.append(logits_and_features(net, batch)[1].numpy())
        return np.concatenate(out)

    def export(self, format: str, path: str | Path, overwrite: bool = False, **options: Any) -> dict[str, Any]:
        """finetune-export: ``onnx`` / ``torchscript`` (a file), ``hf`` (a Hugging Face model folder)."""
        from finetune.export import export

        return export(self.path, format, path, overwrite=overwrite, **options)


def load(ckpt_or_run: str | Path | Run) -> Model:
    """A checkpoint file, or a run folder (its scored checkpoint, as finetune-predict reads it)."""
    from finetune.export import _one_checkpoint
    from finetune.models.checkpoint import load_classifier

    target = ckpt_or_run.dir if isinstance(ckpt_or_run, Run) else ckpt_or_run
    if not isinstance(target, (str, Path)):
        raise FinetuneError(f"load() takes a checkpoint path or a run folder, not a {type(target).__name__}.")
    path = _one_checkpoint(str(target))
    loaded = load_classifier(path)
    return Model(path, list(loaded.classes), loaded)
