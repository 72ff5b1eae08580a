"""What predict / export / eval write: never an input, never an existing file without overwrite=true,
always whole (temp file + rename), checked before the heavy work; bad input images are skipped and listed."""

from __future__ import annotations

import csv
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, CLASSES, FAST, assert_user_error, image_folders, make_cfg, run_cli, write_images

from finetune.errors import FinetuneError
from finetune.export import export
from finetune.inference import evaluate, predict
from finetune.train import train


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_folders(tmp_path_factory.mktemp("outputs") / "images", 4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, images) -> Path:
    run = tmp_path_factory.mktemp("outputs_run") / "run"
    train(make_cfg([f"data.root={images}", f"run_dir={run}", "policy=linear_probe", "report=false", *FAST]))
    return run / "checkpoints" / "best.ckpt"


def _predict_cfg(ckpt: Path, inp, output, *extra: str):
    return make_cfg([f"ckpt={ckpt}", f"input={inp}", f"output={output}", "accelerator=cpu", *extra],
                    config_name="predict")


def _read_only_dir(tmp_path: Path) -> Path:
    """A folder nobody may write to: /sys for root (chmod does not stop root), else a chmod 555 folder."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- item 1: never overwrite an input


def test_predict_never_overwrites_its_inputs_even_with_overwrite(ckpt, images, tmp_path):
    before = ckpt.read_bytes()
    image = next((images / "circle").glob("*.png"))
    image_bytes = image.read_bytes()
    link = tmp_path / "link.ckpt"
    link.symlink_to(ckpt)
    hard = tmp_path / "hard.png"
    os.link(image, hard)
    cases = [(ckpt, "checkpoint"), (link, "checkpoint"), (image, "input image"), (hard, "input image"),
             (images, "input folder")]
    for output, what in cases:
        with pytest.raises(FinetuneError, match=f"output={output}.*{what}"):
            predict(_predict_cfg(ckpt, images, output, "overwrite=true"))
    assert ckpt.read_bytes() == before and image.read_bytes() == image_bytes


def test_export_never_overwrites_its_checkpoint(ckpt, tmp_path):
    before = ckpt.read_bytes()
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(FinetuneError, match=f"output={ckpt}.*checkpoint"):
            export(str(ckpt), fmt, ckpt, overwrite=True)
    assert ckpt.read_bytes() == before


def test_existing_output_needs_overwrite(ckpt, images, tmp_path):
    earlier = tmp_path / "preds.csv"
    earlier.write_text("earlier predictions\n")
    with pytest.raises(FinetuneError, match=f"output={earlier} already exists.*overwrite=true"):
        predict(_predict_cfg(ckpt, images, earlier))
    assert earlier.read_text() == "earlier predictions\n"
    predict(_predict_cfg(ckpt, images, earlier, "overwrite=true"))
    assert earlier.read_text().startswith("path,label,")

    model = tmp_path / "model.pt"
    model.write_text("an earlier model")
    with pytest.raises(FinetuneError, match=f"output={model} already exists.*overwrite=true"):
        export(str(ckpt), "torchscript", model)
    assert model.read_text() == "an earlier model"
    export(str(ckpt), "torchscript", model, overwrite=True)
    assert model.stat().st_size > 1000 and _leftovers(tmp_path) == []


def test_output_is_checked_before_the_checkpoint_is_loaded(tmp_path, images):
    """The output check comes first: a missing checkpoint is not even opened when the output is unusable."""
    missing = tmp_path / "no_such.ckpt"
    (tmp_path / "afile").write_text("x")
    bad_outputs = {
        tmp_path: "is a folder",
        tmp_path / "afile" / "preds.csv": "is a file, not a folder",
        _read_only_dir(tmp_path) / "preds.csv": "not writable",
        f"{tmp_path}/new_folder/": "is a folder",
    }
    for output, what in bad_outputs.items():
        with pytest.raises(FinetuneError, match=f"output={output}.*{what}"):
            predict(_predict_cfg(missing, images, output))
        with pytest.raises(FinetuneError, match=f"output={output}.*{what}"):
            export(str(missing), "torchscript", output)
    assert not (tmp_path / "new_folder").exists()


def test_output_in_new_nested_folder_is_created(ckpt, images, tmp_path):
    output = tmp_path / "a" / "b" / "preds.csv"
    assert predict(_predict_cfg(ckpt, images, output)) == output
    assert len(output.read_text().splitlines()) == 1 + 4 * len(CLASSES)
    model = tmp_path / "c" / "d" / "model.onnx"
    export(str(ckpt), "onnx", model)
    assert model.stat().st_size > 1000 and _leftovers(model.parent) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert model.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_export_refuses_an_extension_of_the_other_format(ckpt, tmp_path):
    with pytest.raises(FinetuneError, match="output=.*model.pt.*format=torchscript"):
        export(str(ckpt), "onnx", tmp_path / "model.pt")
    with pytest.raises(FinetuneError, match="output=.*model.onnx.*format=onnx"):
        export(str(ckpt), "torchscript", tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_predict_refuses_image_or_checkpoint_name_for_csv(ckpt, images, tmp_path):
    for name in ("out.jpg", "out.ckpt"):
        with pytest.raises(FinetuneError, match=f"output=.*{name}.*CSV"):
            predict(_predict_cfg(ckpt, images, tmp_path / name))


# --------------------------------------------------------------------------- item 11: say what and where, exit 2


def test_cli_predict_read_only_and_folder_outputs_exit_2(ckpt, images, tmp_path):
    read_only = _read_only_dir(tmp_path) / "preds.csv"
    result = run_cli("finetune-predict", f"ckpt={ckpt}", f"input={images}", f"output={read_only}", cwd=tmp_path)
    assert_user_error(result, f"output={read_only}", "not writable")
    result = run_cli("finetune-export", f"ckpt={ckpt}", "format=torchscript", f"output={tmp_path}", cwd=tmp_path)
    assert_user_error(result, f"output={tmp_path}", "is a folder")


def _limited_file_size(limit: int):
    """A child whose files cannot grow past ``limit`` bytes: writes fail as on a full disk (EFBIG)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("script", ["finetune-predict", "finetune-export"])
def test_cli_disk_full_while_writing_leaves_nothing(ckpt, images, tmp_path, script):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if script == "finetune-predict":
        output, args = out_dir / "preds.csv", [f"input={images}"]
    else:
        output, args = out_dir / "model.pt", ["format=torchscript"]
    result = subprocess.run([str(BIN / script), f"ckpt={ckpt}", f"output={output}", *args], check=False,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
                            preexec_fn=_limited_file_size(600))
    assert_user_error(result, f"output={output}", "could not be written")
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- item 12: bad inputs skipped and listed


def _messy_folder(images: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "messy"
    good = write_images(folder, "circle", 3, seed=7)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    truncated = folder / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:200])
    bad = {str((folder / n).resolve()): kind for n, kind in
           (("empty.jpg", "zero_byte"), ("notes.png", "not_image"), ("truncated.png", "truncated"))}
    return folder, bad


def test_predict_skips_and_lists_unreadable_images(ckpt, images, tmp_path, capsys):
    folder, bad = _messy_folder(images, tmp_path)
    output = tmp_path / "preds.csv"
    predict(_predict_cfg(ckpt, folder, output))
    with output.open(newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert len(rows) == 6
    for path, row in rows.items():
        if path in bad:
            assert row["label"] == "" and row["probability"] == "" and row["error"].startswith(bad[path]), row
        else:
            assert row["label"] in CLASSES and row["error"] == "", row
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "Skipped 3" in text and all(Path(p).name in text for p in bad)


def test_predict_all_inputs_bad_is_a_clear_error(ckpt, images, tmp_path):
    folder, _ = _messy_folder(images, tmp_path)
    for p in folder.glob("circle_*"):
        p.unlink()
    output = tmp_path / "preds.csv"
    with pytest.raises(FinetuneError, match=f"none of the 3 images under input={folder}"):
        predict(_predict_cfg(ckpt, folder, output))
    assert not output.exists()


def test_predict_accepts_a_list_of_inputs(ckpt, images, tmp_path):
    a, b = sorted((images / "square").glob("*.png"))[:2]
    output = tmp_path / "two.csv"
    predict(_predict_cfg(ckpt, f"[{a},{b},{images / 'circle'}]", output))
    assert len(output.read_text().splitlines()) == 1 + 2 + 4


# --------------------------------------------------------------------------- smaller: nothing else in the cwd


def test_cli_predict_writes_only_its_output(ckpt, images, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_cli("finetune-predict", f"ckpt={ckpt}", f"input={images}", "output=preds.csv", "accelerator=cpu",
                     cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in cwd.iterdir()) == ["preds.csv"]


def test_cli_eval_writes_only_its_metrics_into_run_dir(ckpt, images, tmp_path):
    """run_dir=RUN (e.g. the training run): no second Hydra folder in the cwd, no .hydra/ over the run's own."""
    cwd, run = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    run.mkdir()
    result = run_cli("finetune-eval", f"ckpt={ckpt}", f"data.root={images}", f"run_dir={run}", "accelerator=cpu",
                     cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(cwd.iterdir()) == [] and [p.name for p in run.iterdir()] == ["eval_metrics.json"]


# --------------------------------------------------------------------------- eval


def test_eval_skips_unreadable_images_and_checks_run_dir_first(ckpt, images, tmp_path):
    root = tmp_path / "data"
    for i, kind in enumerate(CLASSES):
        write_images(root / kind, kind, 2, seed=20 + i)
    (root / "circle" / "broken.png").write_text("not an image")
    cfg = make_cfg([f"ckpt={ckpt}", f"data.root={root}", f"run_dir={tmp_path / 'e'}", "accelerator=cpu"],
                   config_name="eval")
    metrics = evaluate(cfg)
    assert metrics["images"] == 6
    assert [s["path"] for s in metrics["skipped"]] == [str((root / "circle" / "broken.png").resolve())]
    afile = tmp_path / "afile"
    afile.write_text("x")
    for run_dir in (afile, _read_only_dir(tmp_path) / "e"):
        cfg = make_cfg([f"ckpt={tmp_path / 'missing.ckpt'}", f"data.root={root}", f"run_dir={run_dir}"],
                       config_name="eval")
        with pytest.raises(FinetuneError, match=f"run_dir={run_dir}"):
            evaluate(cfg)
