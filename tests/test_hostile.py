"""Issue 14's leftovers and what a hostile new user tried next: every one a clear error (exit 2, no
traceback) or the right result, never a silent no-op, a lost file or a Python traceback."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, CLASSES, FAST, assert_user_error, image_folders, make_cfg, run_cli, write_images

from finetune.api import fit
from finetune.config import check_known_keys, validate_train_config
from finetune.errors import FinetuneError
from finetune.inference import evaluate
from finetune.preview import preview
from finetune.train import train


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_folders(tmp_path_factory.mktemp("hostile") / "images", 4)


@pytest.fixture(scope="module")
def run(tmp_path_factory, images) -> Path:
    run = tmp_path_factory.mktemp("hostile_run") / "run"
    train(make_cfg([f"data.root={images}", f"run_dir={run}", "policy=linear_probe", "report=false", *FAST]))
    return run


def _train_cfg(images: Path, *extra: str):
    return make_cfg([f"data.root={images}", *FAST, *extra])


# --------------------------------------------------------------------------- a. a file where run_dir should be


@pytest.mark.parametrize(("script", "run_dir"), [("finetune", "notes.txt"), ("finetune-eval", "notes.txt/sub")])
def test_run_dir_that_is_a_file_is_a_clear_error(tmp_path, images, run, script, run_dir):
    (tmp_path / "notes.txt").write_text("mine\n")
    args = [f"data.root={images}", *FAST] if script == "finetune" else [f"ckpt={run}", f"data.root={images}"]
    result = run_cli(script, f"run_dir={run_dir}", *args, cwd=tmp_path)
    assert_user_error(result, f"run_dir={run_dir} cannot be created", "a file is in the way")
    assert "FileExistsError" not in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- b. stdout closed early


def _with_closed_stdout(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`finetune ARGS | head -0`, deterministically: the pipe's reader is closed before the command writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([str(BIN / args[0]), *args[1:]], stdout=write, stderr=subprocess.PIPE, text=True,
                              cwd=cwd, check=False, timeout=120)
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [("finetune", "--help"), ("finetune", "--cfg", "job"),
                                  ("finetune-predict", "--help")])
def test_closed_stdout_exits_quietly(tmp_path, args):
    result = _with_closed_stdout(*args, cwd=tmp_path)
    assert result.returncode == 141, result.stderr[-2000:]  # as a process killed by SIGPIPE
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_training_goes_on_when_its_console_is_closed(tmp_path, images):
    """`finetune ... | head -1`: the run is not lost (nor its log spammed with logging tracebacks)."""
    result = _with_closed_stdout("finetune", f"data.root={images}", "run_dir=run", "policy=linear_probe",
                                 "report=false", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()


# --------------------------------------------------------------------------- c. keys nothing reads


@pytest.mark.parametrize(("key", "hint"), [
    ("+data.foo=1", None),
    ("+data.val_fractoin=0.3", "data.val_fraction"),
    ("+policy.lr_decy=0.5", "policy.lr_decay"),
    ("+policy.measure.fold=3", "policy.measure.folds"),
    ("+policy.thresholds.small_max=5", "policy.thresholds.small_max_per_class"),
    ("+model.weight=none", "model.weights"),
    ("+ensemble.siz=2", "ensemble.size"),
    ("+regularization.dropuot=0.1", "regularization.dropout"),
    ("+augment.mixup=0.2", "augment.mixup_alpha"),
    ("+seedd=3", "seed"),
])
def test_unread_keys_are_refused(images, key, hint):
    with pytest.raises(FinetuneError) as e:
        validate_train_config(_train_cfg(images, key))
    name = key[1:].split("=")[0]
    assert f"{name} is not a key that finetune reads" in str(e.value)
    if hint:
        assert hint in re.search(r"Did you mean: ([^?]*)\?", str(e.value)).group(1).split(", ")


@pytest.mark.parametrize("key", ["+model.kwargs.drop_rate=0.2", "augment=heavy", "regularization=strong",
                                 "+callbacks.timer._target_=lightning.pytorch.callbacks.Timer",
                                 "logger=tensorboard", "policy=lp_ft", "augment=none"])
def test_free_form_and_every_option_keeps_passing(images, key):
    check_known_keys(_train_cfg(images, key))


@pytest.mark.parametrize(("command", "key"), [("predict", "+outptu=x.csv"), ("eval", "+data.val_fraction=0.2"),
                                              ("export", "+opset=17"), ("preview", "+data.foo=1")])
def test_unread_keys_are_refused_by_every_command(command, key):
    with pytest.raises(FinetuneError, match=f"{key[1:].split('=')[0]} is not a key that finetune-{command} reads"):
        check_known_keys(make_cfg([key], config_name=command), command)


def test_unread_key_on_the_command_line(tmp_path, images):
    result = run_cli("finetune", f"data.root={images}", "+data.vall_fraction=0.3", *FAST, cwd=tmp_path)
    assert_user_error(result, "data.vall_fraction is not a key", "e.g. data.val_fraction=...")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))


# --------------------------------------------------------------------------- d. finetune-preview's output


def _preview_cfg(images: Path, output, *extra: str):
    return make_cfg([f"data.root={images}", f"output={output}", "rows=2", "draws=1", *FAST[:1], *extra],
                    config_name="preview")


def test_preview_never_overwrites_an_input_or_an_existing_file(tmp_path, images):
    image = next((images / CLASSES[0]).iterdir())
    before = image.read_bytes()
    for extra in ((), ("overwrite=true",)):
        with pytest.raises(FinetuneError, match="an input image"):
            preview(_preview_cfg(images, image, *extra))
    assert image.read_bytes() == before
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    with pytest.raises(FinetuneError, match="already exists; pass overwrite=true"):
        preview(_preview_cfg(images, mine))
    assert mine.read_bytes() == b"my picture"
    preview(_preview_cfg(images, mine, "overwrite=true"))
    assert mine.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]  # no temp file left


def test_preview_refuses_a_folder_or_a_format_it_cannot_write(tmp_path, images):
    with pytest.raises(FinetuneError, match="is a folder"):
        preview(_preview_cfg(images, tmp_path))
    with pytest.raises(FinetuneError, match="cannot be written as .csv"):
        preview(_preview_cfg(images, tmp_path / "grid.csv"))
    with pytest.raises(FinetuneError, match="rows=0 must be"):
        preview(_preview_cfg(images, tmp_path / "grid.png", "rows=0"))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- e. endless runs and schedules


@pytest.mark.parametrize(("extra", "message"), [
    (("scheduler=cosine",), "scheduler.T_max=${trainer.max_epochs} is the run's length"),
    (("scheduler=onecycle",), "scheduler=onecycle spreads one cycle over the run's steps"),
    (("scheduler=cosine_restarts", "ensemble.snapshots=true"), "ensemble.snapshots=true takes its snapshots"),
])
def test_endless_run_refuses_a_schedule_that_needs_its_length(images, extra, message):
    with pytest.raises(FinetuneError) as e:
        validate_train_config(_train_cfg(images, "trainer.max_epochs=-1", *extra))
    assert message in str(e.value)


@pytest.mark.parametrize("extra", [("scheduler=onecycle", "trainer.max_steps=20"), ("scheduler=plateau",),
                                   ("scheduler=step",), ("scheduler=cosine_restarts",),
                                   ("scheduler=cosine", "scheduler.T_max=5")])
def test_endless_run_keeps_schedules_that_have_a_length(images, extra):
    validate_train_config(_train_cfg(images, "trainer.max_epochs=-1", *extra))


@pytest.mark.parametrize(("extra", "message"), [
    (("scheduler=step", "scheduler.step_size=0"), "scheduler.step_size=0 must be a whole number >= 1"),
    (("scheduler=cosine", "scheduler.T_max=-3"), "scheduler.T_max=-3 must be a whole number >= 1"),
    (("scheduler=multistep", "scheduler.milestones=[0,3]"), "scheduler.milestones=[0, 3] must be a list"),
    (("scheduler=plateau", "scheduler.factor=2"), "Factor should be < 1.0"),
    (("scheduler=onecycle", "scheduler.pct_start=3"), "pct_start"),
    (("scheduler=onecycle", "scheduler.warmup_epochs=1"), "warmup_epochs must be 0 with scheduler=onecycle"),
])
def test_schedule_settings_torch_refuses_fail_before_any_data(tmp_path, extra, message):
    with pytest.raises(FinetuneError) as e:  # data.root does not even exist: nothing was read
        validate_train_config(_train_cfg(tmp_path / "nothing", *extra))
    assert message in str(e.value)


# --------------------------------------------------------------------------- f. finetune-eval's result


def _eval_cfg(run: Path, images: Path, *extra: str):
    return make_cfg([f"ckpt={run}", f"data.root={images}", "accelerator=cpu", *extra], config_name="eval")


def test_eval_keeps_an_earlier_result_unless_overwrite(tmp_path, images, run):
    out = tmp_path / "eval"
    evaluate(_eval_cfg(run, images, f"run_dir={out}"))
    first = (out / "eval_metrics.json").read_text()
    (out / "eval_metrics.json").write_text(first.replace('"tta"', '"note": "mine", "tta"'))
    with pytest.raises(FinetuneError, match="already holds an eval_metrics.json"):
        evaluate(_eval_cfg(run, images, f"run_dir={out}", "tta=[hflip]"))
    assert '"note": "mine"' in (out / "eval_metrics.json").read_text()
    evaluate(_eval_cfg(run, images, f"run_dir={out}", "overwrite=true", "tta=[hflip]"))
    assert json.loads((out / "eval_metrics.json").read_text())["tta"] == ["hflip"]


def test_failed_eval_leaves_no_empty_output_folder(tmp_path, run):
    result = run_cli("finetune-eval", f"ckpt={run}", "data.root=missing", cwd=tmp_path)
    assert_user_error(result, "data.root=missing does not exist")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- found while hunting


def test_dangling_symlink_run_dir_is_named(tmp_path):
    from finetune.run_folder import hydra_run_dir, is_hydra_fallback, resolve_run_dir

    link = tmp_path / "run"
    link.symlink_to(tmp_path / "nowhere")
    assert is_hydra_fallback(Path(hydra_run_dir(str(link / "sub"), None, "outputs")))  # Hydra's mkdir would raise
    with pytest.raises(FinetuneError, match="is a symbolic link to .*nowhere, which does not exist"):
        resolve_run_dir(make_cfg([f"run_dir={link}"], config_name="eval"))


def test_output_that_appears_meanwhile_is_kept(tmp_path):
    """Two predicts writing one new output at once: the second does not silently replace the first."""
    from finetune.outputs import check_output, write_output

    out = check_output(tmp_path / "preds.csv")
    out.write_text("the other command's result\n")
    with pytest.raises(FinetuneError, match="appeared while this command ran"):
        write_output(out, "mine\n", overwrite=False)
    assert out.read_text() == "the other command's result\n"
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]  # no temp file left
    write_output(out, "mine\n", overwrite=True)
    assert out.read_text() == "mine\n"


def test_device_and_pipe_outputs_are_written_through_never_replaced(tmp_path):
    import stat
    import threading

    from finetune.outputs import check_output, write_output

    assert check_output("/dev/null") == Path("/dev/null")  # no overwrite=true needed, and not replaced
    write_output("/dev/null", "x\n", overwrite=True)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_output(check_output(fifo), "a,b\n")
    reader.join(10)
    assert received == ["a,b\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_quoted_glob_input(images):
    from finetune.data.datasets import scan_inputs

    assert len(scan_inputs(f"{images}/{CLASSES[0]}/*.png")) == 4
    with pytest.raises(FinetuneError, match="matches no image files"):
        scan_inputs(f"{images}/*.txt")


def test_inputs_keep_the_users_names_and_list_what_is_not_an_image(images, tmp_path, caplog):
    """A symlinked image is predicted under the link's name (the name the user joins predictions on), a dangling
    link is reported as one, and a file that is not an image is listed, not silently dropped."""
    import logging

    from finetune.data.datasets import scan_inputs
    from finetune.data.images import BadImageError, load_image

    target = min((images / CLASSES[0]).glob("*.png"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a_link.png").symlink_to(target)
    (inputs / "b_gone.png").symlink_to(tmp_path / "deleted.png")
    (inputs / "c_notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        paths = scan_inputs(inputs)
    assert paths == [str(inputs / "a_link.png"), str(inputs / "b_gone.png")]
    assert "ignored 1 file(s) that are not images" in caplog.text and "c_notes.txt" in caplog.text
    assert scan_inputs(inputs / "a_link.png") == [str(inputs / "a_link.png")]
    assert load_image(paths[0]).shape[-1] == 3
    with pytest.raises(BadImageError, match="dangling symlink"):
        load_image(paths[1])


def test_shell_split_argument_and_unquoted_tilde_are_explained():
    from hydra.errors import OverrideParseException

    from finetune.cli.main import _hydra_error_message

    text = _hydra_error_message(OverrideParseException("b.jpg", "mismatched input"))
    assert "'b.jpg' is not an override (KEY=VALUE)" in text and "input=[a.jpg,b.jpg]" in text
    text = _hydra_error_message(OverrideParseException("data.root=~/x", "LexerNoViableAltException"))
    assert "unquoted ~" in text and "$HOME" in text


def test_repeated_tta_view_is_used_once():
    from finetune.data.tta import check_tta

    assert check_tta(["hflip", "hflip", "vflip"]) == ["hflip", "vflip"]


def test_run_folder_without_a_checkpoint(tmp_path, run):
    import shutil

    from finetune.members import resolve_members

    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("*.ckpt"))
    (crashed / "metrics.json").unlink()
    with pytest.raises(FinetuneError, match="is a run folder without a checkpoint"):
        resolve_members(crashed)
    shutil.copy(run / "checkpoints" / "best.ckpt", crashed / "checkpoints" / "last.ckpt")
    assert resolve_members(crashed) == [str(crashed / "checkpoints" / "last.ckpt")]


@pytest.mark.parametrize(("key", "message"), [
    ("policy.thresholds.similar_max_gap=nan", "similar_max_gap=nan must be"),
    ("policy.thresholds.small_max_per_class=-5", "small_max_per_class=-5 must be"),
    ("callbacks.early_stopping.patience=-1", "patience=-1 must be a whole number"),
])
def test_policy_thresholds_and_patience_are_checked(tmp_path, key, message):
    with pytest.raises(FinetuneError, match=message):
        validate_train_config(_train_cfg(tmp_path, key))


def test_run_without_checkpoint_callbacks_is_warned(images, caplog):
    validate_train_config(_train_cfg(images, "~callbacks.model_checkpoint", "~callbacks.last_checkpoint"))
    assert "this run saves no weights" in caplog.text


def test_one_bad_job_does_not_stop_a_sweep(tmp_path):
    """`-m optimizer.lr=-1,1e-3`: the bad job is refused and marked failed, the good one still trains, and
    the exit status says a job failed (it used to end the sweep at the first bad job)."""
    root = tmp_path / "images"
    for i, kind in enumerate(CLASSES):
        write_images(root / kind, kind, 6, seed=i)
    result = run_cli("finetune", "-m", "optimizer.lr=-1,1e-3", f"data.root={root}", *FAST, "policy=full",
                     "report=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (
        "This sweep job failed" in result.stdout + result.stderr and "optimizer.lr=-1" in result.stdout + result.stderr
    )
    assert "1 of 2 jobs failed (job 0)" in result.stdout
    with open(tmp_path / "sweep" / "sweep_summary.csv") as f:
        rows = {row["job"]: row for row in csv.DictReader(f)}
    assert rows["0"]["status"] == "failed" and rows["1"]["status"] == "done"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_run_folder_among_the_images_is_refused_before_anything_is_written(tmp_path):
    """run_dir inside data.root (or the default outputs/ when finetune is started from the data folder) would mix
    checkpoints into the data and make the next scan read the run folder as a class with no images."""
    data = image_folders(tmp_path / "photos", 3)
    before = _tree(data)
    for run_dir in (data, data / "runs" / "first", data / CLASSES[0]):
        result = run_cli("finetune", f"data.root={data}", f"run_dir={run_dir}", cwd=tmp_path)
        assert_user_error(result, f"run_dir={run_dir} is inside data.root={data}", f"run_dir={tmp_path / 'runs'}/NAME")
    result = run_cli("finetune", "data.root=.", cwd=data)  # started from inside the data: the default outputs/
    assert_user_error(result, "default folder (outputs/<date>/<time> in the current folder", "from another folder")
    assert _tree(data) == before  # no .hydra, log or lock left among the images
    with pytest.raises(FinetuneError, match="is inside data.root"):
        fit(data, run_dir=data / "runs" / "api")
    assert _tree(data) == before


def test_a_run_folder_beside_the_split_folders_is_allowed(tmp_path):
    """With train/val/test folders only those are read, so data.root/runs/NAME is outside the data."""
    from finetune.run_folder import run_dir_in_data

    root = tmp_path / "data"
    for split in ("train", "test"):
        image_folders(root / split, 1)
    assert not run_dir_in_data(root / "runs" / "a", root) and not run_dir_in_data(tmp_path / "elsewhere", root)
    assert run_dir_in_data(root / "train" / "runs", root) and run_dir_in_data(root, root)
    assert run_dir_in_data(root / "test" / CLASSES[0], root)
