"""The bad-input matrix: what a careless or hostile user hands the engine, on real files.

Every case asserts the exit code, exactly one clear line on stderr that names the file (no traceback), that no
output was left behind (not even hidden staging files) and that every input is byte-identical afterwards.
Classes: code execution (crafted pickles), data loss (outputs against inputs and each other, model names,
phantoms over a dataset), silently wrong results (truncated / corrupt NIfTI, NaN voxels, DICOM with a missing
or corrupt slice, geometry in evaluate, NaN or oversized checkpoints, uninterpretable scribble maps),
resources (time budgets), and messages / exit codes (OS errors, bad regexes, SIGINT and SIGTERM).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttentionSegLib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from AttentionSegLib.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED, main
from AttentionSegLib.imageio import read_image, write_dicom_series, write_image
from AttentionSegLib.networks import build_network
from AttentionSegLib.volume import Volume

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_REASON = "running as root: chmod does not stop root from reading or writing, so no OS error can be made"


# -- fixtures and helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    net = build_network("attention_unet", spatial_dims=3, in_channels=1, out_channels=2,
                        filters=[4, 8, 16, 32])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    preprocessing = {"normalization": {"kind": "ct_window", "window": [-200, 300]}, "spacing": None,
                     "patch_size": [8, 16, 16]}
    return save_checkpoint(path, net, preprocessing=preprocessing, labels={1: "organ"})


def _volume(dtype=np.int16) -> Volume:
    array = np.random.default_rng(3).normal(0, 100, size=(8, 20, 18)).astype(dtype)
    return Volume(array, spacing=(1.2, 1.1, 2.5), origin=(5.0, 6.0, -7.0))


@pytest.fixture()
def image(tmp_path) -> Path:
    return write_image(_volume(), tmp_path / "in" / "ct.nii.gz")


def _digest(paths) -> dict[str, str]:
    """sha256 of every file under the given files/folders."""
    out = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _fails(capsys, code: int, *args, names: str | Path, inputs=(), absent=(), folders=()) -> str:
    """Run the CLI; assert the exit code, one stderr line naming ``names``, inputs intact, outputs absent."""
    before = _digest(inputs)
    listing = {Path(f): sorted(p.name for p in Path(f).iterdir()) for f in folders}
    capsys.readouterr()
    assert main([str(a) for a in args]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert str(names) in lines[0], f"the message does not name {names}: {lines[0]}"
    assert _digest(inputs) == before, "an input was changed"
    for path in map(Path, absent):
        assert not path.exists(), f"{path} was written"
    for folder, names_before in listing.items():
        assert sorted(p.name for p in folder.iterdir()) == names_before, f"{folder} gained files"
    return lines[0]


# -- code execution ------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates ``marker`` (standing for any code a crafted file would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_train_resume_refuses_a_crafted_training_state(capsys, tmp_path):
    from AttentionSegLib.phantom import make_phantom_dataset

    data = Path(make_phantom_dataset(tmp_path / "data", n_cases=2, seed=1, shape=(16, 32, 32)))
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "code_ran"
    state = run / "training_state.pt"
    torch.save({"network": _RunsCode(marker), "iteration": 1}, state)

    _fails(capsys, EXIT_BAD_INPUT, "train", "--data", data, "-o", run, "--network", "attention_unet",
           "--network-config", '{"filters": [4, 8, 16, 32]}', "--patch-size", "16,32,32", "--batch-size", "1",
           "--iterations", "2", "--validation", "0", "--device", "cpu", "--resume", "-q",
           names=state, inputs=[state, data], absent=[marker, run / "model_last.pt"])
    assert not marker.exists(), "unpickling ran code"


def test_a_crafted_checkpoint_runs_no_code(capsys, image, tmp_path):
    marker, bad = tmp_path / "code_ran", tmp_path / "evil.pt"
    torch.save({"format": "attentionseg-checkpoint", "payload": _RunsCode(marker)}, bad)
    _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", tmp_path / "seg.nii.gz", "--model", bad,
           names=bad, inputs=[image, bad], absent=[tmp_path / "seg.nii.gz", marker])


# -- data loss: outputs against inputs and against each other, model names -----------------------------------


def test_uncertainty_may_not_overwrite_the_input(capsys, image, checkpoint, tmp_path):
    out = tmp_path / "seg.nii.gz"
    _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", out, "--model", checkpoint, "--uncertainty", image,
           names=image, inputs=[image, checkpoint], absent=[out])


def test_the_input_through_another_spelling_is_still_the_input(capsys, image, checkpoint, tmp_path):
    other = image.parent / ".." / image.parent.name / image.name
    link = tmp_path / "link.nii.gz"
    os.link(image, link)  # a second hard link: another name, the same file
    for target in (other, link):
        _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", target, "--model", checkpoint,
               names=target, inputs=[image])


def test_attention_maps_may_not_replace_an_input_or_another_output(capsys, checkpoint, tmp_path):
    folder = tmp_path / "maps"
    source = write_image(_volume(), folder / "attention_gate1.nii.gz")
    _fails(capsys, EXIT_BAD_INPUT, "segment", source, "-o", tmp_path / "seg.nii.gz", "--model", checkpoint,
           "--attention-dir", folder, names=source, inputs=[source], absent=[tmp_path / "seg.nii.gz"],
           folders=[folder])
    image = write_image(_volume(), tmp_path / "ct.nii.gz")
    clash = folder / "attention_x.nii.gz"
    _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", clash, "--model", checkpoint, "--attention-dir",
           folder, names=clash, inputs=[image], folders=[folder])
    _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", tmp_path / "seg.nii.gz", "--model", checkpoint,
           "--attention-dir", image, names=image, inputs=[image], absent=[tmp_path / "seg.nii.gz"])


def test_two_outputs_on_one_path_and_outputs_over_the_model(capsys, image, checkpoint, tmp_path):
    out = tmp_path / "seg.nii.gz"
    _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", out, "--model", checkpoint, "--uncertainty", out,
           names=out, inputs=[image], absent=[out])
    copy = tmp_path / "model.nii.gz"
    copy.write_bytes(checkpoint.read_bytes())  # a checkpoint given an image's name is still an input
    _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", copy, "--model", copy, names=copy,
           inputs=[image, copy])


def test_output_extension_and_folder_are_checked_before_any_work(capsys, image, checkpoint, tmp_path):
    _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", tmp_path / "seg.txt", "--model", checkpoint,
           names=tmp_path / "seg.txt", inputs=[image], absent=[tmp_path / "seg.txt"])
    _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", tmp_path / "seg.nii.gz", "--model", checkpoint,
           "--uncertainty", tmp_path / "unc.png", names=tmp_path / "unc.png", inputs=[image],
           absent=[tmp_path / "seg.nii.gz"])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", blocker / "seg.nii.gz", "--model", checkpoint,
           names=blocker / "seg.nii.gz", inputs=[image, blocker])


def test_refine_outputs_against_its_inputs(capsys, image, checkpoint, tmp_path):
    scribbles = np.full(_volume().shape, 255, np.uint8)
    scribbles[4, 5:8, 5:8], scribbles[4, 15:18, 12:15] = 1, 0
    scribble_path = write_image(_volume().with_array(scribbles), tmp_path / "scribbles.nii.gz")
    out = tmp_path / "seg.nii.gz"
    _fails(capsys, EXIT_BAD_INPUT, "refine", image, "--scribbles", scribble_path, "-o", scribble_path,
           "--time-budget", "0", names=scribble_path, inputs=[image, scribble_path])
    _fails(capsys, EXIT_BAD_INPUT, "refine", image, "--scribbles", scribble_path, "-o", out, "--model",
           checkpoint, "--save-model", checkpoint, "--time-budget", "0", names=checkpoint,
           inputs=[image, scribble_path, checkpoint], absent=[out])
    # -o must be an image and --save-model a checkpoint, so the two can never name one file
    _fails(capsys, EXIT_BAD_INPUT, "refine", image, "--scribbles", scribble_path, "-o", out, "--save-model",
           out, "--time-budget", "0", names=out, inputs=[image, scribble_path], absent=[out])


def test_evaluate_may_not_overwrite_a_label_file(capsys, tmp_path):
    data = _dataset(tmp_path)
    label = data / "labelsTr" / "case_0.nii.gz"
    _fails(capsys, EXIT_BAD_INPUT, "evaluate", data, "--predictions", data / "labelsTr", "-o", label, "-q",
           names=label, inputs=[data])


def test_phantoms_are_not_written_over_a_users_dataset(capsys, tmp_path):
    """``phantom`` into a dataset folder would have replaced its dataset.json (and a ``case_000``)."""
    data = _dataset(tmp_path)
    _fails(capsys, EXIT_BAD_INPUT, "phantom", data, "--cases", "1", names=data, inputs=[data], folders=[data])


@pytest.mark.parametrize("command", [["demo", "--quiet", "-o"], ["phantom"], ["train", "--quiet", "-o"]])
def test_an_output_folder_that_is_a_file_is_one_line(capsys, tmp_path, command):
    existing = tmp_path / "results"
    existing.write_text("not a folder")
    extra = ["--data", _dataset(tmp_path), "--iterations", "1"] if command[0] == "train" else []
    line = _fails(capsys, EXIT_BAD_INPUT, *command, existing, *extra, names=existing, inputs=[existing],
                  folders=[tmp_path])
    assert "is an existing file; give a folder" in line


def test_a_failed_command_leaves_none_of_its_outputs(capsys, image, checkpoint, tmp_path, monkeypatch):
    import AttentionSegLib.imageio as image_module

    real = image_module.write_image

    def second_write_fails(volume, path, **kw):
        if "unc" in Path(path).name:
            raise image_module.ImageWriteError(f"cannot write image '{path}': disk full")
        return real(volume, path, **kw)

    monkeypatch.setattr(image_module, "write_image", second_write_fails)
    folder = tmp_path / "out"
    out, unc, maps = folder / "seg.nii.gz", folder / "unc.nii.gz", folder / "maps"
    assert main(["segment", str(image), "-o", str(out), "--model", str(checkpoint), "--uncertainty", str(unc),
                 "--attention-dir", str(maps), "-q", "--device", "cpu"]) == EXIT_BAD_INPUT
    assert "disk full" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "the labels were written although the uncertainty failed"


def test_model_names_are_names_not_paths(capsys, checkpoint, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ATTENTIONSEG_HOME", str(home))
    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"precious")
    for name in ("../x", "../../victim", str(tmp_path / "victim"), "a/b", "..", ".hidden", "a\\b", "x" * 200):
        _fails(capsys, EXIT_BAD_INPUT, "models", "import", name, checkpoint, names="invalid model name",
               inputs=[checkpoint, victim])
    assert not home.exists() or not any(home.rglob("*.pt")), "nothing was imported"
    capsys.readouterr()
    assert main(["models", "import", "my-model_v1.2", str(checkpoint)]) == 0
    assert (home / "models" / "my-model_v1.2.pt").is_file()


def test_a_malformed_model_manifest_is_one_line_naming_it(capsys, image, tmp_path, monkeypatch):
    home = tmp_path / "home"
    manifest = home / "models" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    monkeypatch.setenv("ATTENTIONSEG_HOME", str(home))
    for text in ("[1, 2]", '{"models": {"x": 3}}', '{"models": [1]}', "{not json", '{"models": {"x": {}}}'):
        manifest.write_text(text)
        _fails(capsys, EXIT_BAD_INPUT, "models", "list", names=manifest, inputs=[manifest])
        _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", tmp_path / "s.nii.gz", "--model", "some_model",
               names=manifest, inputs=[manifest, image], absent=[tmp_path / "s.nii.gz"])


def test_a_home_that_cannot_hold_models_is_one_line_naming_it(capsys, checkpoint, tmp_path, monkeypatch):
    blocker = tmp_path / "home_is_a_file"
    blocker.write_text("x")
    monkeypatch.setenv("ATTENTIONSEG_HOME", str(blocker))
    _fails(capsys, EXIT_BAD_INPUT, "models", "import", "m", checkpoint, names=blocker,
           inputs=[checkpoint, blocker])


@pytest.mark.skipif(IS_ROOT, reason=ROOT_REASON)
def test_read_only_home_and_folders(capsys, image, checkpoint, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    locked = tmp_path / "locked"
    locked.mkdir()
    for folder in (home, locked):
        folder.chmod(0o555)
    try:
        monkeypatch.setenv("ATTENTIONSEG_HOME", str(home))
        _fails(capsys, EXIT_BAD_INPUT, "models", "import", "m", checkpoint, names=home, inputs=[checkpoint])
        _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", locked / "seg.nii.gz", "--model", checkpoint,
               names=locked, inputs=[image], absent=[locked / "seg.nii.gz"])
        unreadable = tmp_path / "unreadable.pt"
        unreadable.write_bytes(checkpoint.read_bytes())
        unreadable.chmod(0o000)
        _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", tmp_path / "seg.nii.gz", "--model", unreadable,
               names=unreadable, inputs=[image], absent=[tmp_path / "seg.nii.gz"])
    finally:
        for folder in (home, locked):
            folder.chmod(0o755)


# -- silently wrong results ----------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".nii.gz", ".nii"])
def test_a_truncated_nifti_is_an_error_not_zeros(capsys, checkpoint, tmp_path, extension):
    whole = write_image(_volume(), tmp_path / f"whole{extension}", compress=extension.endswith(".gz"))
    cut = tmp_path / f"cut{extension}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    out = tmp_path / "seg.nii.gz"
    line = _fails(capsys, EXIT_BAD_INPUT, "segment", cut, "-o", out, "--model", checkpoint, names=cut,
                  inputs=[cut], absent=[out])
    assert "truncated" in line


def test_a_corrupted_nii_gz_is_an_error(capsys, checkpoint, tmp_path):
    data = bytearray(write_image(_volume(), tmp_path / "whole.nii.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(bytes(data))
    _fails(capsys, EXIT_BAD_INPUT, "segment", bad, "-o", tmp_path / "seg.nii.gz", "--model", checkpoint,
           names=bad, inputs=[bad], absent=[tmp_path / "seg.nii.gz"])


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_nan_voxel_is_an_error_not_an_empty_segmentation(capsys, checkpoint, tmp_path, extension):
    array = _volume(np.float32).array
    array[3, 4, 5] = np.nan
    array[1, 1, 1] = np.inf
    path = write_image(_volume().with_array(array), tmp_path / f"nan{extension}")
    out = tmp_path / "seg.nii.gz"
    line = _fails(capsys, EXIT_BAD_INPUT, "segment", path, "-o", out, "--model", checkpoint, names=path,
                  inputs=[path], absent=[out])
    assert "not finite" in line
    assert read_image(path, allow_nonfinite=True).array.shape == array.shape, "the explicit opt-in reads"


def test_the_engine_api_refuses_non_finite_images(checkpoint):
    from AttentionSegLib.inference import predict_volume
    from AttentionSegLib.interactive import InteractiveSession

    array = _volume(np.float32).array
    array[0, 0, 0] = np.nan
    volume = _volume().with_array(array)
    with pytest.raises(ValueError, match="not finite"):
        predict_volume(load_checkpoint(checkpoint), volume, device="cpu")
    with pytest.raises(ValueError, match="not finite"):
        InteractiveSession(volume, checkpoint, device="cpu")


def _dicom_series(folder: Path) -> Path:
    """A real DICOM CT series (one file per slice) written by SimpleITK."""
    return write_dicom_series(_volume(), folder)


def test_a_dicom_series_with_a_missing_slice_is_an_error_naming_it(capsys, checkpoint, tmp_path):
    series = _dicom_series(tmp_path / "series")
    sorted(series.iterdir())[3].unlink()
    line = _fails(capsys, EXIT_BAD_INPUT, "segment", series, "-o", tmp_path / "seg.nii.gz", "--model",
                  checkpoint, names=series, inputs=[series], absent=[tmp_path / "seg.nii.gz"])
    assert "missing" in line and "spacing" in line


@pytest.mark.parametrize("index, keep", [(4, 200), (0, -10), (-1, -300)])
def test_a_dicom_series_with_a_corrupt_slice_is_an_error(capsys, checkpoint, tmp_path, index, keep):
    """A cut slice in the middle, or at either end of the stack (where no spacing check could see it)."""
    series = _dicom_series(tmp_path / "series")
    victim = sorted(series.iterdir())[index]
    victim.write_bytes(victim.read_bytes()[:keep])
    line = _fails(capsys, EXIT_BAD_INPUT, "segment", series, "-o", tmp_path / "seg.nii.gz", "--model",
                  checkpoint, names=series, inputs=[series], absent=[tmp_path / "seg.nii.gz"])
    assert "corrupt" in line


def test_a_dicom_series_with_uneven_spacing_is_an_error(capsys, checkpoint, tmp_path):
    series = _dicom_series(tmp_path / "series")
    victim = sorted(series.iterdir())[5]
    image = sitk.ReadImage(str(victim))
    position = [float(v) for v in image.GetMetaData("0020|0032").split("\\")]
    position[2] += 0.8  # one slice 0.8 mm off its place
    image.SetOrigin(position)
    image.SetMetaData("0020|0032", "\\".join(f"{v:g}" for v in position))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(victim))
    writer.Execute(image)
    line = _fails(capsys, EXIT_BAD_INPUT, "segment", series, "-o", tmp_path / "seg.nii.gz", "--model",
                  checkpoint, names=series, inputs=[series], absent=[tmp_path / "seg.nii.gz"])
    assert "uneven slice spacing" in line


def test_an_intact_dicom_series_still_reads_also_beside_other_files(tmp_path):
    series = _dicom_series(tmp_path / "series")
    (series / "notes.txt").write_text("scanned on Monday")
    volume = read_image(series)
    assert volume.shape == _volume().shape and np.allclose(volume.spacing, _volume().spacing)


def _dataset(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    volume = _volume()
    labels = np.zeros(volume.shape, np.uint8)
    labels[2:6, 4:12, 5:14] = 1
    write_image(volume, data / "imagesTr" / "case_0.nii.gz")
    write_image(volume.with_array(labels), data / "labelsTr" / "case_0.nii.gz")
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1}}))
    return data


def test_evaluate_compares_geometry_not_only_shape(capsys, tmp_path):
    data = _dataset(tmp_path)
    truth = read_image(data / "labelsTr" / "case_0.nii.gz")
    flipped = Volume(truth.array[:, :, ::-1].copy(), truth.spacing,
                     truth.ijk_to_lps((truth.size[0] - 1, 0, 0)), (-1, 0, 0, 0, 1, 0, 0, 0, 1))
    prediction = write_image(flipped, tmp_path / "predictions" / "case_0.nii.gz")  # same place, flipped axis
    report = tmp_path / "report.json"
    line = _fails(capsys, EXIT_BAD_INPUT, "evaluate", data, "--predictions", prediction.parent, "-o", report,
                  "-q", names=prediction, inputs=[data, prediction], absent=[report])
    assert "geometry" in line
    write_image(truth, prediction)  # the same grid scores normally
    assert main(["evaluate", str(data), "--predictions", str(prediction.parent), "-o", str(report),
                 "-q"]) == 0
    assert json.loads(report.read_text())["summary"]["dice_mean"] == 1.0


def test_a_checkpoint_with_nan_weights_and_no_digest_is_refused(capsys, image, checkpoint, tmp_path):
    payload = torch.load(checkpoint, weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key].clone().fill_(float("nan"))
    payload.pop("sha256_state")
    bad = tmp_path / "nan_weights.pt"
    torch.save(payload, bad)
    line = _fails(capsys, EXIT_BAD_INPUT, "segment", image, "-o", tmp_path / "seg.nii.gz", "--model", bad,
                  names=bad, inputs=[image, bad], absent=[tmp_path / "seg.nii.gz"])
    assert "non-finite" in line


def test_a_tiny_checkpoint_cannot_ask_for_a_huge_network(checkpoint, tmp_path):
    payload = torch.load(checkpoint, weights_only=True)
    payload["network"]["config"]["filters"] = [4096, 8192, 16384, 32768]  # ~10^10 weights, 40 GB
    payload.pop("sha256_state")
    bad = tmp_path / "huge.pt"
    torch.save(payload, bad)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="refusing to build"):
        load_checkpoint(bad)
    assert time.perf_counter() - started < 20, "refused before the network was allocated"


@pytest.mark.parametrize("bad, message", [
    (lambda m: m.astype(np.float32), "dtype float32"),
    (lambda m: m == 1, "dtype bool"),
    (lambda m: np.where(m == 255, -1, m.astype(np.int16)), "negative"),
])
def test_scribble_maps_the_session_cannot_interpret_are_refused(checkpoint, bad, message):
    from AttentionSegLib.interactive import InteractiveSession

    session = InteractiveSession(_volume(), checkpoint, device="cpu")
    scribbles = np.full(_volume().shape, 255, np.uint8)
    scribbles[4, 5:8, 5:8], scribbles[4, 15:18, 12:15] = 1, 0
    with pytest.raises(ValueError, match=message):
        session.add_scribbles(bad(scribbles))
    with pytest.raises(ValueError, match=message):
        session.refine(time_budget_s=0, scribbles=bad(scribbles))
    assert (session.scribbles == 255).all() and not session.can_undo, "nothing was taken in"
    session.add_scribbles(scribbles.astype(np.int64))  # any integer map with valid values is fine


def test_a_failed_step_keeps_the_undo_and_redo_history(checkpoint, monkeypatch):
    from AttentionSegLib.interactive import InteractiveSession

    session = InteractiveSession(_volume(), checkpoint, device="cpu", max_history=2)
    maps = []
    for k in range(3):
        scribbles = np.full(_volume().shape, 255, np.uint8)
        scribbles[k, 5:8, 5:8] = 1
        maps.append(scribbles)
    for scribbles in maps:
        session.add_scribbles(scribbles)
    assert session.history.depth == (2, 0)  # the first step was trimmed away

    def fail(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(session.family, "refine", fail)
    state = session.scribbles.copy()
    with pytest.raises(RuntimeError, match="out of memory"):
        session.refine(time_budget_s=0, scribbles=maps[0], replace=True)
    assert session.history.depth == (2, 0), "the failed step did not cost an undo step"
    np.testing.assert_array_equal(session.scribbles, state)
    session.undo()
    assert session.history.depth == (1, 1)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.refine(time_budget_s=0)
    assert session.history.depth == (1, 1), "the failed step did not clear the redo step"
    session.redo()
    np.testing.assert_array_equal(session.scribbles, state)


# -- resources -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["inf", "nan", "-1", "1e9", "3601"])
def test_refine_time_budget_is_bounded(capsys, image, tmp_path, budget):
    empty = np.full(_volume().shape, 255, np.uint8)
    scribbles = write_image(_volume().with_array(empty), tmp_path / "s.nii.gz")
    out = tmp_path / "o.nii.gz"
    line = _fails(capsys, EXIT_BAD_INPUT, "refine", image, "--scribbles", scribbles, "-o", out,
                  f"--time-budget={budget}", names="--time-budget", inputs=[image, scribbles], absent=[out])
    assert "3600" in line


def test_the_session_api_bounds_the_budget_too(checkpoint):
    from AttentionSegLib.interactive import InteractiveSession

    session = InteractiveSession(_volume(), checkpoint, device="cpu")
    scribbles = np.full(_volume().shape, 255, np.uint8)
    scribbles[4, 5:8, 5:8] = 1
    session.add_scribbles(scribbles)
    for budget in (float("inf"), float("nan"), -1.0, 1e9):
        with pytest.raises(ValueError, match="time budget"):
            session.refine(time_budget_s=budget)
    assert session.history.depth == (1, 0)


# -- messages and exit codes ---------------------------------------------------------------------------------


def test_a_bad_cases_regex_is_one_line(capsys, tmp_path):
    data = _dataset(tmp_path)
    _fails(capsys, EXIT_BAD_INPUT, "evaluate", data, "--predictions", data / "labelsTr", "--cases", "case_([",
           names="case_([", inputs=[data])


def test_sigterm_while_writing_leaves_no_partial_files(capsys, image, checkpoint, tmp_path, monkeypatch):
    import AttentionSegLib.imageio as image_module

    real = image_module.write_image

    def terminated_midway(volume, path, **kw):
        written = real(volume, path, **kw)
        if "unc" in Path(path).name:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` does while the outputs are being written
            time.sleep(1)
        return written

    monkeypatch.setattr(image_module, "write_image", terminated_midway)
    handler = signal.getsignal(signal.SIGTERM)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(["segment", str(image), "-o", str(out_dir / "seg.nii.gz"), "--model", str(checkpoint),
                 "--uncertainty", str(out_dir / "unc.nii.gz"), "-q", "--device", "cpu"])
    assert code == EXIT_TERMINATED
    assert "terminated" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == [], "no output and no hidden .partial staging is left"
    assert signal.getsignal(signal.SIGTERM) is handler, "the command restores the previous handler"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when torch is loading")
@pytest.mark.parametrize("after_s", [0.0, 0.1])
def test_sigint_during_start_up_is_one_line_and_exit_130(image, checkpoint, tmp_path, after_s):
    """SIGINT as torch's libraries load and 0.1 s later (inside its C++ start-up, where an interrupt used to
    abort the process or be lost: exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "AttentionSegLib.cli", "segment", str(image), "-o",
                                str(tmp_path / "seg.nii.gz"), "--model", str(checkpoint), "-q"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    maps = Path(f"/proc/{process.pid}/maps")
    while time.monotonic() < deadline and process.poll() is None:  # wait until torch is being imported
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and err.strip().endswith("interrupted")
    assert not (tmp_path / "seg.nii.gz").exists()
