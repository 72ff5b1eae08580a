"""Bad input gives one FinetuneError that names the key or path (the CLI: exit 2, no traceback).

A few cases go through the installed console scripts; the rest call the library in-process.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
from conftest import CLASSES, FAST, assert_user_error, image_folders, make_cfg, run_cli, write_images

from finetune.cli.main import report_errors
from finetune.data.datasets import scan_dataset
from finetune.errors import FinetuneError
from finetune.models.backbone import load_pretrained
from finetune.models.checkpoint import load_classifier, read_checkpoint
from finetune.train import train


class RunsCode:
    """Unpickling this runs a shell command: what a malicious 'checkpoint' would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))

@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_folders(tmp_path_factory.mktemp("errors") / "images", 6)

@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory, images) -> Path:
    run = tmp_path_factory.mktemp("errors_run")
    train(make_cfg([f"data.root={images}", f"run_dir={run}", *FAST]))
    return run / "checkpoints" / "best.ckpt"

# --------------------------------------------------------------------------- CLI (subprocess)

def test_cli_unknown_backbone_suggests_close_names(images, tmp_path):
    result = run_cli("finetune", f"data.root={images}", "model.backbone=resnet5", f"run_dir={tmp_path / 'r'}",
                     cwd=tmp_path)
    assert_user_error(result, "model.backbone=resnet5", "resnet50")

def test_cli_missing_data_root(tmp_path):
    result = run_cli("finetune", f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    message = assert_user_error(result, "data.root is not set")
    assert "finetune data.root=" in message  # says how to pass it

def test_cli_predict_refuses_foreign_checkpoint(images, tmp_path):
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 4)}, "epoch": 3}, ckpt)
    out = tmp_path / "p.csv"
    result = run_cli("finetune-predict", f"ckpt={ckpt}", f"input={images}", f"output={out}", cwd=tmp_path)
    assert_user_error(result, f"ckpt={ckpt}", "not a finetune checkpoint")
    assert not out.exists()

def test_cli_eval_refuses_code_in_pickle(images, tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "finetune": RunsCode(marker)}, ckpt)
    result = run_cli("finetune-eval", f"ckpt={ckpt}", f"data.root={images}", f"run_dir={tmp_path / 'r'}",
                     cwd=tmp_path)
    assert_user_error(result, f"ckpt={ckpt}", "refused", "system")
    assert not marker.exists()

# --------------------------------------------------------------------------- config and backbone

def test_unknown_backbone_in_process():
    with pytest.raises(FinetuneError, match="model.backbone=resnet5 ") as err:
        load_pretrained("resnet5", "none")
    assert "resnet50" in str(err.value)
    with pytest.raises(FinetuneError, match="not a timm model") as err:
        load_pretrained("qqqqqqqq", "none")
    assert "Did you mean" not in str(err.value)

def test_weights_that_do_not_exist(tmp_path):
    with pytest.raises(FinetuneError, match="model.weights=offline only has weights for tf_efficientnet_lite0"):
        load_pretrained("resnet18", "offline")
    with pytest.raises(FinetuneError, match=f"model.weights={tmp_path / 'w.safetensors'}"):
        load_pretrained("resnet18", str(tmp_path / "w.safetensors"))

def test_unknown_trainer_argument(images, tmp_path):
    cfg = make_cfg([f"data.root={images}", f"run_dir={tmp_path / 'r'}", "+trainer.bogus=1", *FAST])
    with pytest.raises(FinetuneError, match="trainer.bogus is not an argument of lightning"):
        train(cfg)
    cfg = make_cfg([f"data.root={images}", f"run_dir={tmp_path / 'r'}", "+trainer.max_epoch=1", *FAST])
    with pytest.raises(FinetuneError, match="max_epochs"):  # close match suggested
        train(cfg)

def test_unknown_monitor_key(images, tmp_path):
    cfg = make_cfg([f"data.root={images}", f"run_dir={tmp_path / 'r'}", "monitor=val/accuracy", *FAST])
    with pytest.raises(FinetuneError, match="monitor=val/accuracy") as err:
        train(cfg)
    assert "val/acc" in str(err.value)
    cfg = make_cfg([f"data.root={images}", f"run_dir={tmp_path / 'r'}", "callbacks.early_stopping.monitor=val_loss",
                    *FAST])
    with pytest.raises(FinetuneError, match="callbacks.early_stopping.monitor=val_loss"):
        train(cfg)

# --------------------------------------------------------------------------- data

def test_data_root_unset_or_missing(tmp_path):
    for unset in (None, "", "???"):
        with pytest.raises(FinetuneError, match="data.root is not set"):
            scan_dataset(unset)
    with pytest.raises(FinetuneError, match="data.root is not set"):
        train(make_cfg([f"run_dir={tmp_path / 'r'}", *FAST]))
    with pytest.raises(FinetuneError, match=f"data.root={tmp_path / 'nope'} does not exist"):
        scan_dataset(tmp_path / "nope")

def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="has no class sub-folders"):
        scan_dataset(tmp_path / "empty")

def test_loose_images_without_class_folders(tmp_path):
    write_images(tmp_path / "flat", "circle", 3, seed=0)
    with pytest.raises(FinetuneError, match="holds 3 images directly"):
        scan_dataset(tmp_path / "flat")

def test_class_folder_without_images(tmp_path):
    root = tmp_path / "imgs"
    write_images(root / "circle", "circle", 3, seed=0)
    (root / "square").mkdir()
    (root / "square" / "notes.txt").write_text("no images here")
    with pytest.raises(FinetuneError, match="Class 'square'") as err:
        scan_dataset(root)
    assert str(root / "square") in str(err.value)

def test_only_one_class(tmp_path):
    write_images(tmp_path / "imgs" / "circle", "circle", 3, seed=0)
    with pytest.raises(FinetuneError, match="at least 2"):
        scan_dataset(tmp_path / "imgs")

def test_val_folder_with_unknown_class(tmp_path):
    root = tmp_path / "s"
    for kind in ("circle", "square"):
        write_images(root / "train" / kind, kind, 2, seed=0)
    write_images(root / "val" / "triangle", "circle", 2, seed=1)
    with pytest.raises(FinetuneError, match="triangle"):
        scan_dataset(root)

def test_csv_missing_columns(tmp_path):
    (tmp_path / "a.csv").write_text("file,class\nx.png,cat\n")
    with pytest.raises(FinetuneError, match="'path' and 'label'") as err:
        scan_dataset(tmp_path / "a.csv")
    assert "['class', 'file']" in str(err.value)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(FinetuneError, match="none"):
        scan_dataset(tmp_path / "empty.csv")

def test_csv_listing_missing_files(tmp_path):
    write_images(tmp_path / "pics", "circle", 1, seed=0)
    rows = ["path,label", "pics/circle_0_0.png,circle"] + [f"pics/gone_{i}.png,square" for i in range(7)]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(FinetuneError, match="lists 7 image") as err:
        scan_dataset(tmp_path / "l.csv")
    message = str(err.value)
    assert f"line 3: {tmp_path / 'pics' / 'gone_0.png'}" in message and "and 2 more" in message

def test_csv_label_only_in_val(tmp_path):
    paths = write_images(tmp_path, "circle", 3, seed=0)
    rows = ["path,label,split", f"{paths[0].name},a,train", f"{paths[1].name},b,train", f"{paths[2].name},c,val"]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(FinetuneError, match=r"\['c'\] appear in split 'val'"):
        scan_dataset(tmp_path / "l.csv")

def test_root_is_a_file_but_not_csv(tmp_path):
    p = write_images(tmp_path, "circle", 1, seed=0)[0]
    with pytest.raises(FinetuneError, match="not a .csv"):
        scan_dataset(p)

# --------------------------------------------------------------------------- checkpoints

def test_truncated_checkpoint(real_ckpt, tmp_path):
    data = real_ckpt.read_bytes()
    for n, name in ((len(data) // 2, "half.ckpt"), (len(data) - 100, "short.ckpt"), (200, "head.ckpt")):
        broken = tmp_path / name
        broken.write_bytes(data[:n])
        with pytest.raises(FinetuneError, match=f"ckpt={broken} is not a readable checkpoint"):
            load_classifier(broken)

def test_text_and_empty_files_are_not_checkpoints(tmp_path):
    cases = {"notes.ckpt": b"hello world\n", "conf.ckpt": b"a: 1\nb: [1, 2]\n", "empty.ckpt": b"",
             "rand.ckpt": bytes(range(256)) * 3}
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(FinetuneError, match=f"ckpt={p} is not a"):
            read_checkpoint(p)

def test_missing_checkpoint(tmp_path):
    with pytest.raises(FinetuneError, match="ckpt is not set"):
        load_classifier(None)
    with pytest.raises(FinetuneError, match=f"ckpt={tmp_path / 'x.ckpt'} does not exist"):
        load_classifier(tmp_path / "x.ckpt")

def test_checkpoints_from_other_toolkits(tmp_path):
    lightning_like = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(2, 2)}, "epoch": 1}, lightning_like)
    with pytest.raises(FinetuneError, match="not a finetune checkpoint") as err:
        load_classifier(lightning_like)
    assert "model.weights=" in str(err.value)  # says how to use such weights instead

    timm_weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), timm_weights)
    with pytest.raises(FinetuneError, match=f"ckpt={timm_weights} is not a finetune checkpoint"):
        load_classifier(timm_weights)

    tensor_only = tmp_path / "t.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(FinetuneError, match="found Tensor"):
        load_classifier(tensor_only)

@pytest.mark.parametrize("how", ["torch.save", "pickle-2", "pickle-4"])
def test_pickle_that_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.ckpt"
    payload = {"state_dict": {}, "finetune": RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, p)
    else:
        with p.open("wb") as f:
            pickle.dump(payload, f, protocol=int(how[-1]))
    with pytest.raises(FinetuneError, match=f"ckpt={p}"):
        load_classifier(p)
    assert not marker.exists()
    # Sanity: the payload really runs the command when unpickled without protection.
    if how == "pickle-2":
        pickle.loads(p.read_bytes())
        assert marker.exists()

def test_tampered_checkpoints(real_ckpt, tmp_path):
    data = torch.load(real_ckpt, map_location="cpu", weights_only=True)

    newer = dict(data, finetune={**data["finetune"], "format": 99})
    torch.save(newer, tmp_path / "newer.ckpt")
    with pytest.raises(FinetuneError, match="newer finetune"):
        load_classifier(tmp_path / "newer.ckpt")

    wrong = dict(data, finetune={**data["finetune"], "num_classes": 5, "classes": [*CLASSES, "a", "b"]})
    torch.save(wrong, tmp_path / "wrong.ckpt")
    with pytest.raises(FinetuneError, match="weights do not match tf_efficientnet_lite0"):
        load_classifier(tmp_path / "wrong.ckpt")

    # The untouched checkpoint still loads: the failures above come from the edits.
    assert load_classifier(real_ckpt).classes == list(CLASSES)

# --------------------------------------------------------------------------- CLI message formatting

def test_cli_message_keeps_long_paths_whole(capsys):
    path = "/tmp/pytest-of-someone/pytest-123/test_some_long_name0/my-dataset/with/several/levels/of/nesting/images"

    def fail(_cfg):
        raise FinetuneError(f"data.root={path} does not exist.")

    with pytest.raises(SystemExit) as exit_info:
        report_errors(fail)(None)
    assert exit_info.value.code == 2
    assert path in capsys.readouterr().err
