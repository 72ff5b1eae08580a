"""``finetune-export format=hf output=DIR``: a Hugging Face Hub model folder that plain timm loads.

The folder is timm's own (``timm.models.save_for_hf``): ``config.json`` (architecture, classes as
``label_names``, the preprocessing the model was trained with as its ``pretrained_cfg``) and
``model.safetensors``, plus a ``README.md`` model card (timm's ``generate_readme``, with the run's data
summary, policy decision, metrics and intended-use caveats). ``timm.create_model("local-dir:DIR",
pretrained=True)`` rebuilds it without finetune; ``huggingface-cli upload USER/NAME DIR`` publishes it and
``timm.create_model("hf-hub:USER/NAME", pretrained=True)`` loads it from there. Before anything is written,
the folder is built in a temporary folder, loaded back with timm and checked against the checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.models.checkpoint import LoadedCheckpoint, load_classifier, read_checkpoint
from finetune.models.module import CHECKPOINT_KEY
from finetune.open_set import unknown_metadata

HF_FILES = ("config.json", "model.safetensors", "README.md")
# The open-set knn score's bank of normalised training features (config.json "finetune_unknown" says how to use it).
OPEN_SET_FILE = "open_set_bank.safetensors"


def check_hf_output(output: Any, ckpt: str, overwrite: bool) -> Path:
    """A folder that is new, empty, or (overwrite=true) an earlier export; never the checkpoint's run folder."""
    if output in (None, ""):
        raise FinetuneError("output is not set: format=hf writes a folder, e.g. output=my-model-hf.")
    path = Path(str(output)).expanduser()
    if path.exists() and not path.is_dir():
        raise FinetuneError(f"output={output} is a file; format=hf writes a folder (config.json, model.safetensors, "
                            f"README.md): name a new folder, e.g. output={path.with_suffix('')}-hf.")
    ckpt_path = Path(ckpt).resolve()
    if path.resolve() in (ckpt_path.parent, *ckpt_path.parents[:2]):
        raise FinetuneError(f"output={output} is the folder the checkpoint is in (or its run folder); the export "
                            f"would mix with the run's files: name a new folder.")
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if found and not overwrite:
        raise FinetuneError(f"output={output} is not empty ({', '.join(found[:5])}); pass overwrite=true to replace "
                            f"an earlier export there, or name a new folder.")
    foreign = sorted(set(found) - {*HF_FILES, OPEN_SET_FILE})
    if found and foreign:
        raise FinetuneError(f"output={output} holds files an export does not write ({', '.join(foreign[:5])}); "
                            f"overwrite=true replaces only an earlier export: name a new folder.")
    return path


def _timm_network(loaded: LoadedCheckpoint, ckpt: str) -> torch.nn.Module:
    """The trained network as the timm model it is; refused when timm could not rebuild it by name."""
    meta = read_checkpoint(ckpt)[CHECKPOINT_KEY]
    if meta.get("cut_after_stage") is not None:
        raise FinetuneError(
            f"ckpt={ckpt} is a network cut after stage {meta['cut_after_stage']} (policy stage_probe), which timm "
            f"cannot build from a config.json; format=hf needs a whole {meta['backbone']}. Export it as "
            f"format=onnx or format=torchscript, or train with a policy that keeps every stage "
            f"(policy=partial, full, linear_probe, lp_ft or gradual).")
    if str(meta.get("pooling", "avg")) != "avg":
        raise FinetuneError(
            f"ckpt={ckpt} pools with {meta['pooling']} (regularization.pooling), which timm's config.json cannot "
            f"express; export it as format=onnx or format=torchscript.")
    return loaded.module.net.eval()


def _data_config(loaded: LoadedCheckpoint) -> dict[str, Any]:
    pp = loaded.preprocessing
    return {"input_size": (3, pp.image_size, pp.image_size), "interpolation": pp.interpolation,
            "mean": tuple(pp.mean), "std": tuple(pp.std), "crop_pct": pp.crop_pct, "crop_mode": "center"}


def _run_facts(ckpt: str) -> dict[str, Any]:
    """metrics.json, policy.json and data_report.json of the run the checkpoint came from, where present."""
    run = Path(ckpt).resolve().parent.parent
    facts = {}
    for name in ("metrics", "policy", "data_report"):
        try:
            facts[name] = json.loads((run / f"{name}.json").read_text())
        except (OSError, ValueError):
            continue
    return facts


def model_card(loaded: LoadedCheckpoint, backbone: str, facts: dict[str, Any]) -> str:
    """timm's README layout (YAML metadata for the Hub, details) with what the run measured and decided."""
    from timm.models._hub import generate_readme

    metrics, policy = facts.get("metrics", {}), facts.get("policy", {})
    images = metrics.get("images") or {}
    details: dict[str, Any] = {
        "Model Type": "Image classification, fine-tuned with finetune",
        "Backbone": backbone,
        "Classes": ", ".join(loaded.classes),
        "Input": f"{loaded.preprocessing.image_size} px RGB (config.json's pretrained_cfg holds the preprocessing)",
    }
    if images:
        details["Training data"] = {f"{split} images": n for split, n in images.items()}
    if policy:
        decision = {"applied": policy.get("policy_applied"), "cell": policy.get("quadrant"),
                    **{f"reason {i + 1}": r for i, r in enumerate(policy.get("reasons") or [])}}
        details["Transfer policy"] = {k: v for k, v in decision.items() if v is not None}
    kinds = ("acc", "balanced_acc", "macro_f1", "map", "micro_f1", "loss")
    scores = {k: f"{float(v):.4f}" for k, v in metrics.items()
              if k.split("/")[-1] in kinds and isinstance(v, (int, float))}
    if scores:
        details["Metrics"] = scores
    usage = (
        "```python\nimport timm, torch\nfrom PIL import Image\n\n"
        "model = timm.create_model('hf-hub:USER/NAME', pretrained=True).eval()  # or 'local-dir:PATH'\n"
        "config = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**config)\n"
        "probs = model(transform(Image.open('image.jpg').convert('RGB')).unsqueeze(0)).softmax(-1)\n"
        "print(model.pretrained_cfg['label_names'][probs.argmax().item()])\n```\n"
    )
    unknown = ""
    if loaded.multilabel:
        unknown = (" **Several labels per image:** apply `.sigmoid()` to the logits instead of `.softmax(-1)` and "
                   "keep every class at or above its threshold in config.json `finetune_thresholds` (tuned on "
                   "validation).")
    if loaded.open_set:
        unknown = (f" To say \"none of these\", compare the {loaded.open_set['score']} score with "
                   f"`finetune_unknown` in config.json (the score of the pooled features against "
                   f"{OPEN_SET_FILE} for knn): below its threshold, {100 * loaded.open_set['reject']:g}% of the "
                   f"known validation images fell; finetune-predict unknown=auto applies it.")
    assigns = ("gives each of them a probability of its own (several labels per image)" if loaded.multilabel else
               "assigns every image to one of them (an image of something else still gets one of these labels)")
    card = {
        "description": (
            f"Fine-tuned from a pretrained timm backbone with finetune. **Intended use and limits:** it knows only "
            f"the classes listed below, and {assigns}; the metrics below are on held-out images of the data set it "
            f"was trained on, which may not represent yours: check it on your own images before relying on it."
            + unknown),
        "details": details,
        "usage": usage,
        "tags": ["image-classification", "timm", "finetune"],
    }
    return generate_readme(card, f"{backbone} fine-tuned ({len(loaded.classes)} classes)")


def fold_temperature(net: torch.nn.Module, temperature: float) -> None:
    """Divide the classifier's weights and bias by the calibration temperature: the folder's logits are then the
    calibrated ones (logits / T), so plain timm's softmax gives the probabilities finetune-predict gives."""
    if temperature == 1.0:
        return
    head = net.get_classifier()
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)


def export_hf(ckpt: str, output: Any, overwrite: bool = False) -> dict[str, Any]:
    """Write the folder (checked first: built in a temp folder, loaded back with timm alone, compared)."""
    from timm import create_model
    from timm.models import save_for_hf

    path = check_hf_output(output, ckpt, overwrite)
    loaded = load_classifier(ckpt)
    net = _timm_network(loaded, ckpt)
    fold_temperature(net, loaded.temperature)
    backbone = read_checkpoint(ckpt)[CHECKPOINT_KEY]["backbone"]
    size = loaded.preprocessing.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp-") as tmp:
        extra = {"finetune_unknown": unknown_metadata(loaded.open_set)} if loaded.open_set else {}
        if loaded.multilabel:  # a sigmoid per class (the usage note in README.md says so)
            extra |= {"finetune_task": "multilabel",
                      "finetune_thresholds": loaded.thresholds or [0.5] * len(loaded.classes)}
        save_for_hf(net, tmp, model_config={"label_names": list(loaded.classes),
                                            "finetune_temperature": loaded.temperature, **extra},
                    safe_serialization=True, data_config=_data_config(loaded))
        if loaded.open_set and "bank" in loaded.open_set:  # the knn score's training features
            from safetensors.torch import save_file

            save_file({"bank": loaded.open_set["bank"].contiguous()}, str(Path(tmp) / OPEN_SET_FILE))
        (Path(tmp) / "README.md").write_text(model_card(loaded, backbone, _run_facts(ckpt)))
        rebuilt = create_model(f"local-dir:{tmp}", pretrained=True).eval()
        with torch.no_grad():
            diff = float((rebuilt(example) - net(example)).abs().max())
        if diff > 1e-4 or list(rebuilt.pretrained_cfg.get("label_names") or []) != list(loaded.classes):
            raise FinetuneError(f"the folder timm rebuilt differs from the checkpoint (max |logit difference| "
                                f"{diff:.2e}); nothing was written to output={output}. Please report this with the "
                                f"backbone name ({backbone}).")
        if path.is_dir():
            shutil.rmtree(path)  # empty, or an earlier export (check_hf_output)
        Path(tmp).rename(path)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    files = [*HF_FILES, *([OPEN_SET_FILE] if loaded.open_set and "bank" in loaded.open_set else [])]
    return {"output": str(path), "format": "hf", "files": files, "classes": loaded.classes,
            "input_shape": ["N", 3, size, size], "max_abs_diff_vs_torch": diff, "checked_on": len(example)}
