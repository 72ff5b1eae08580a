"""``finetune-export``: a trained checkpoint as ONNX or TorchScript that takes raw images.

The exported model includes the preprocessing, so a deployment only feeds pixels: input
``[N, 3, H, W]`` RGB at the trained size, ``uint8`` in 0..255 (default) or ``float32`` in 0..1;
output: class probabilities. The classes and preprocessing travel inside the file (ONNX metadata,
TorchScript extra files), and the ONNX file is checked against torch with onnxruntime on export.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.models.checkpoint import LoadedCheckpoint, load_classifier

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
INPUT_DTYPES = ("uint8", "float32")


class DeployedClassifier(nn.Module):
    """Raw RGB pixels -> normalised input -> network -> softmax probabilities."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], uint8: bool):
        super().__init__()
        self.net = net
        self.uint8 = uint8
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.uint8:
            x = x / 255.0
        return self.net((x - self.mean) / self.std).softmax(dim=-1)


def metadata(loaded: LoadedCheckpoint, dtype: str) -> dict[str, str]:
    pp = loaded.preprocessing
    return {
        "finetune.classes": json.dumps(loaded.classes),
        "finetune.preprocessing": json.dumps(pp.to_dict()),
        "finetune.input": json.dumps({"layout": "NCHW", "channels": "RGB", "dtype": dtype,
                                      "range": "0..255" if dtype == "uint8" else "0..1",
                                      "size": [pp.image_size, pp.image_size],
                                      "note": "resize the shorter side to size/crop_pct and centre-crop before feeding"}),
        "finetune.output": "softmax probabilities, one per class in finetune.classes order",
    }


def sample_inputs(loaded: LoadedCheckpoint, images: list[Any], dtype: str) -> torch.Tensor:
    """Real images cropped the evaluation way, as the exported model's raw input."""
    import albumentations as A

    pp = loaded.preprocessing
    crop = A.Compose([A.SmallestMaxSize(max_size=pp.resize_size, interpolation=pp.cv2_interpolation),
                      A.CenterCrop(height=pp.image_size, width=pp.image_size)])
    batch = torch.stack([torch.from_numpy(crop(image=im)["image"]).permute(2, 0, 1) for im in images])
    return batch if dtype == "uint8" else batch.float() / 255.0


def export(ckpt: str, fmt: str, output: str | Path, dtype: str = "uint8", check_images: list[Any] | None = None) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise FinetuneError(f"format={fmt} is not one of {', '.join(FORMATS)}.")
    if dtype not in INPUT_DTYPES:
        raise FinetuneError(f"input_dtype={dtype} is not one of {', '.join(INPUT_DTYPES)}.")
    loaded = load_classifier(ckpt)
    model = DeployedClassifier(loaded.module.net.eval(), loaded.preprocessing.mean, loaded.preprocessing.std, dtype == "uint8").eval()
    size = loaded.preprocessing.image_size
    if check_images is None:
        generator = torch.Generator().manual_seed(0)
        example = torch.randint(0, 256, (2, 3, size, size), generator=generator, dtype=torch.uint8)
        example = example if dtype == "uint8" else example.float() / 255.0
    else:
        example = sample_inputs(loaded, check_images, dtype)
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(loaded, dtype)
    with torch.no_grad():
        expected = model(example)
    tmp = output.with_name(output.name + ".tmp")
    if fmt == "torchscript":
        scripted = torch.jit.trace(model, example[:1])
        torch.jit.save(scripted, str(tmp), _extra_files={k: v.encode() for k, v in meta.items()})
        tmp.replace(output)
        got = torch.jit.load(str(output))(example)
    else:
        try:
            import onnx
            import onnxruntime  # noqa: F401  (the parity check below)
        except ModuleNotFoundError as e:
            raise FinetuneError(f"format=onnx needs the package '{e.name}': `pip install finetune[export]` "
                                f"(onnx, onnxruntime, onnxscript), or use format=torchscript.") from None
        torch.onnx.export(model, (example[:1],), str(tmp), input_names=["images"], output_names=["probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        proto = onnx.load(str(tmp))
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
        tmp.replace(output)
        got = torch.from_numpy(run_onnx(output, example.numpy()))
    diff = float((got.detach() - expected).abs().max())
    result = {"output": str(output), "format": fmt, "input_dtype": dtype, "input_shape": ["N", 3, size, size],
              "classes": loaded.classes, "max_abs_diff_vs_torch": diff, "checked_on": len(example)}
    if diff > 1e-4:
        raise FinetuneError(f"the exported {fmt} model differs from torch by {diff:.2e} (> 1e-4) on {len(example)} images; "
                            f"the file {output} should not be used. Please report this with the backbone name.")
    return result


def run_onnx(path: str | Path, images) -> Any:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


def run_export(cfg) -> dict[str, Any]:
    """CLI: ``finetune-export ckpt=... format=onnx|torchscript output=... [input_dtype=uint8|float32]``;
    the parity check runs on images from ``check_images`` (a folder or file) when given."""
    images = None
    if cfg.get("check_images"):
        from finetune.data.datasets import scan_inputs
        from finetune.data.images import load_image

        images = [load_image(p) for p in scan_inputs(cfg.check_images)[:16]]
    if not cfg.get("output"):
        raise FinetuneError("output is not set: pass output=model.onnx (or model.pt for torchscript).")
    result = export(cfg.ckpt, str(cfg.format), cfg.output, str(cfg.input_dtype), images)
    print(f"Exported {result['format']} -> {result['output']} (input {result['input_dtype']} {result['input_shape']}, "
          f"{len(result['classes'])} classes); max |difference| vs torch on {result['checked_on']} images: "
          f"{result['max_abs_diff_vs_torch']:.2e}")
    return result
