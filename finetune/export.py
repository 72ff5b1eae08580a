"""``finetune-export``: a trained checkpoint as ONNX or TorchScript that takes raw images, or (format=hf) as a
Hugging Face Hub model folder that plain timm loads (``finetune/export_hf.py``).

The exported model includes the preprocessing, so a deployment only feeds pixels: input
``[N, 3, H, W]`` RGB at the trained size, ``uint8`` in 0..255 (default) or ``float32`` in 0..1;
output: class probabilities, and with ``known_score=true`` (a run that fitted an open-set threshold) a
``known_score`` per image (below the threshold in the metadata's ``finetune.unknown``: "none of these").
The classes and preprocessing travel inside the file (ONNX metadata, TorchScript extra files), and the ONNX
file is checked against torch with onnxruntime on export. The file is serialised in memory and checked there;
only a model that passed is written (temp file + rename), and never over the checkpoint or an existing file
without overwrite=true.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import FinetuneError, close_matches
from finetune.models.checkpoint import LoadedCheckpoint, load_classifier
from finetune.open_set import known_scores, logits_and_features, unknown_metadata
from finetune.outputs import check_output, write_output

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript", "hf")
INPUT_DTYPES = ("uint8", "float32")
# File name endings that say which format a file holds: a mismatch is a mistyped command, not a choice.
SUFFIX_FORMAT = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
                 ".torchscript": "torchscript", ".jit": "torchscript"}


class DeployedClassifier(nn.Module):
    """Raw RGB pixels -> normalised input -> network -> logits / calibration temperature -> softmax; with an
    open-set record, also the "known" score per image (finetune/open_set.py; the knn bank is a buffer)."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], uint8: bool,
                 temperature: float = 1.0, open_set: dict[str, Any] | None = None, multilabel: bool = False):
        super().__init__()
        self.net = net
        self.uint8 = uint8
        self.multilabel = multilabel  # a sigmoid per class instead of the softmax
        self.temperature = float(temperature)
        self.score = open_set["score"] if open_set else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("bank", open_set["bank"].float() if open_set and "bank" in open_set else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if self.uint8:
            x = x / 255.0
        x = (x - self.mean) / self.std
        if self.multilabel:
            return self.net(x).sigmoid()
        if self.score is None:
            return (self.net(x) / self.temperature).softmax(dim=-1)
        logits, features = logits_and_features(self.net, x)
        return ((logits / self.temperature).softmax(dim=-1),
                known_scores(self.score, logits, features, self.temperature, self.bank))


def metadata(loaded: LoadedCheckpoint, dtype: str, known_score: bool = False) -> dict[str, str]:
    pp = loaded.preprocessing
    return {
        "finetune.classes": json.dumps(loaded.classes),
        "finetune.preprocessing": json.dumps(pp.to_dict()),
        "finetune.input": json.dumps({"layout": "NCHW", "channels": "RGB", "dtype": dtype,
                                      "range": "0..255" if dtype == "uint8" else "0..1",
                                      "size": [pp.image_size, pp.image_size],
                                      "note": ("resize the shorter side to size/crop_pct and centre-crop "
                                               "before feeding")}),
        "finetune.output": "softmax probabilities, one per class in finetune.classes order",
        "finetune.temperature": json.dumps(loaded.temperature),  # the logits are divided by it (calibration)
    } | ({"finetune.output": "sigmoid probabilities, one per class in finetune.classes order: the image shows each "
                             "class whose probability is at or above its threshold in finetune.thresholds",
          "finetune.task": "multilabel",
          "finetune.thresholds": json.dumps(loaded.thresholds or [0.5] * len(loaded.classes))}
         if loaded.multilabel else {}) | (
         {"finetune.output": "probabilities: softmax probabilities, one per class in finetune.classes order; "
                             "known_score: the open-set score (finetune.unknown)"} if known_score else {}) | (
         {"finetune.unknown": json.dumps(unknown_metadata(loaded.open_set) | (
             {} if known_score else {"note": "export with known_score=true for the score output"}))}
         if loaded.open_set else {})


def sample_inputs(loaded: LoadedCheckpoint, images: list[Any], dtype: str) -> torch.Tensor:
    """Real images cropped the evaluation way, as the exported model's raw input."""
    import albumentations as A

    from finetune.data.transforms import eval_crop

    crop = A.Compose(eval_crop(loaded.preprocessing))
    batch = torch.stack([torch.from_numpy(crop(image=im)["image"]).permute(2, 0, 1) for im in images])
    return batch if dtype == "uint8" else batch.float() / 255.0


def check_export_output(output: Any, fmt: str, ckpt: Any, overwrite: bool = False,
                        inputs: list[tuple[str, str]] | None = None) -> Path:
    """check_output's rules (the checkpoint is never replaced), and the output's name fits the format."""
    path = check_output(output, [("the checkpoint being read", str(ckpt)), *(inputs or [])], overwrite)
    suffix = path.suffix.lower()
    if suffix == ".ckpt":
        raise FinetuneError(f"output={output} names a checkpoint file; an exported model is not one: name it "
                            f"{'model.onnx' if fmt == 'onnx' else 'model.pt'}.")
    if SUFFIX_FORMAT.get(suffix, fmt) != fmt:
        raise FinetuneError(f"output={output} names a {SUFFIX_FORMAT[suffix]} file but format={fmt}: pass "
                            f"format={SUFFIX_FORMAT[suffix]}, or name the file "
                            f"model.{'onnx' if fmt == 'onnx' else 'pt'}.")
    return path


def _one_checkpoint(ckpt: Any) -> str:
    """``ckpt`` as one file: a run folder means the checkpoint it scored (as finetune-predict reads it)."""
    from finetune.members import resolve_members

    members = resolve_members(ckpt)
    if len(members) > 1:
        raise FinetuneError(f"ckpt={ckpt} is an ensemble of {len(members)} checkpoints; an exported model is one "
                            f"network: pass one of them, e.g. ckpt={members[0]}.")
    return members[0]


def export(ckpt: str, fmt: str, output: str | Path, dtype: str = "uint8", check_images: list[Any] | None = None,
           overwrite: bool = False, known_score: bool = False) -> dict[str, Any]:
    fmt, dtype = str(fmt).lower(), str(dtype).lower()
    if fmt not in FORMATS:
        raise FinetuneError(f"format={fmt} is not one of {', '.join(FORMATS)}.{close_matches(str(fmt), FORMATS)}")
    if dtype not in INPUT_DTYPES:
        raise FinetuneError(f"input_dtype={dtype} is not one of {', '.join(INPUT_DTYPES)}.")
    ckpt = _one_checkpoint(ckpt)
    if fmt == "hf":
        from finetune.export_hf import export_hf

        return export_hf(ckpt, output, overwrite)
    output = check_export_output(output, fmt, ckpt, overwrite)
    loaded = load_classifier(ckpt)
    if known_score and not loaded.open_set:
        from finetune.open_set import checked_record

        checked_record(None, ckpt, "known_score=true")
    pp = loaded.preprocessing
    model = DeployedClassifier(loaded.module.net.eval(), pp.mean, pp.std, dtype == "uint8", loaded.temperature,
                               loaded.open_set if known_score else None, loaded.multilabel).eval()
    size = loaded.preprocessing.image_size
    if check_images is None:
        generator = torch.Generator().manual_seed(0)
        example = torch.randint(0, 256, (2, 3, size, size), generator=generator, dtype=torch.uint8)
        example = example if dtype == "uint8" else example.float() / 255.0
    else:
        example = sample_inputs(loaded, check_images, dtype)
    meta = metadata(loaded, dtype, known_score)
    outputs = ["probabilities", "known_score"] if known_score else ["probabilities"]
    with torch.no_grad():
        expected = _as_tuple(model(example))
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch's deprecation notices on every jit call: the user chose TorchScript
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
            scripted = torch.jit.trace(model, example[:1])
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer, _extra_files={k: v.encode() for k, v in meta.items()})
            data = buffer.getvalue()
            got = _as_tuple(torch.jit.load(io.BytesIO(data))(example))
    else:
        try:
            import onnx
            import onnxruntime  # noqa: F401  (the parity check below)
        except ModuleNotFoundError as e:
            raise FinetuneError(f"format=onnx needs the package '{e.name}': `pip install finetune[export]` "
                                f"(onnx, onnxruntime, onnxscript), or use format=torchscript.") from None
        buffer = io.BytesIO()
        torch.onnx.export(model, (example[:1],), buffer, input_names=["images"], output_names=outputs,
                          dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
                          opset_version=17, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        data = proto.SerializeToString()
        got = tuple(torch.from_numpy(o) for o in onnx_outputs(data, example.numpy()))
    diff = max(float((g.detach() - e).abs().max()) for g, e in zip(got, expected))
    if diff > 1e-4:
        raise FinetuneError(f"the exported {fmt} model differs from torch by {diff:.2e} (> 1e-4) on {len(example)} "
                            f"images; nothing was written to output={output}. "
                            "Please report this with the backbone name.")
    write_output(output, data, overwrite=overwrite)
    return {"output": str(output), "format": fmt, "input_dtype": dtype, "input_shape": ["N", 3, size, size],
            "classes": loaded.classes, "max_abs_diff_vs_torch": diff, "checked_on": len(example)}


def _as_tuple(output: Any) -> tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def run_onnx(model: str | Path | bytes, images) -> Any:
    """The probabilities of an ONNX model (a file, or its bytes), run with onnxruntime on the CPU."""
    return onnx_outputs(model, images)[0]


def onnx_outputs(model: str | Path | bytes, images) -> list[Any]:
    """Every output of an ONNX model (probabilities, and known_score when it has an open-set threshold)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


def run_export(cfg) -> dict[str, Any]:
    """CLI: ``finetune-export ckpt=... format=onnx|torchscript|hf output=... [input_dtype=uint8|float32]``;
    the parity check runs on images from ``check_images`` (a folder or file) when given. The output is
    checked before anything is loaded."""
    from finetune.config import check_known_keys

    check_known_keys(cfg, "export")
    if not cfg.output:
        raise FinetuneError("output is not set: pass output=model.onnx (or model.pt for torchscript).")
    images = None
    if cfg.check_images:
        from finetune.data.datasets import scan_inputs
        from finetune.data.images import BadImageError, load_image

        paths = scan_inputs(cfg.check_images, key="check_images")
        reads = [("the check_images input", str(cfg.check_images))] + [("a check_images image", p) for p in paths]
        if str(cfg.format).lower() in ("onnx", "torchscript"):  # else export() checks it (or says the formats)
            check_export_output(cfg.output, str(cfg.format).lower(), _one_checkpoint(cfg.ckpt), bool(cfg.overwrite),
                                reads)
        images = []
        for path in paths:  # up to 16 readable ones; an unreadable file is not worth stopping the export for
            try:
                images.append(load_image(path))
            except BadImageError as e:
                log.warning("check_images: skipped %s", e)
            if len(images) == 16:
                break
        images = images or None
    result = export(cfg.ckpt, str(cfg.format), cfg.output, str(cfg.input_dtype), images, bool(cfg.overwrite),
                    bool(cfg.known_score))
    if result["format"] == "hf":
        print(f"Exported a Hugging Face model folder -> {result['output']} ({', '.join(result['files'])}; "
              f"{len(result['classes'])} classes); loaded back with timm, max |difference| vs torch: "
              f"{result['max_abs_diff_vs_torch']:.2e}. Load it with timm.create_model('local-dir:{result['output']}', "
              f"pretrained=True); publish it with `huggingface-cli upload USER/NAME {result['output']}`.")
        return result
    print(f"Exported {result['format']} -> {result['output']} (input {result['input_dtype']} {result['input_shape']}, "
          f"{len(result['classes'])} classes); max |difference| vs torch on {result['checked_on']} images: "
          f"{result['max_abs_diff_vs_torch']:.2e}")
    return result
