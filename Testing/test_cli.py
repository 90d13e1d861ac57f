"""``attentionseg``: the commands users run, on real files; bad input fails cleanly and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionSegLib.checkpoint import save_checkpoint
from AttentionSegLib.cli import main
from AttentionSegLib.imageio import read_image, write_image
from AttentionSegLib.networks import build_network
from AttentionSegLib.volume import Volume

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    net = build_network("attention_unet", spatial_dims=3, in_channels=1, out_channels=2,
                        filters=[4, 8, 16, 32, 64])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return save_checkpoint(path, net,
                           preprocessing={"normalization": {"kind": "ct_window", "window": [-200, 300]},
                                                     "spacing": None, "patch_size": [16, 32, 32]},
                           labels={1: "organ"})


@pytest.fixture()
def image(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    array = rng.normal(0, 100, size=(10, 30, 28)).astype(np.int16)
    volume = Volume(array, spacing=(1.2, 1.1, 3.0), origin=(5.0, 6.0, -7.0),
                    direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return write_image(volume, tmp_path / "ct.nii.gz")


def _run(*args: str) -> int:
    return main([str(a) for a in args])


def test_segment_writes_labels_and_attention_with_the_input_geometry(image, checkpoint, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert _run("segment", image, "-o", out, "--model", checkpoint, "--attention-dir", tmp_path / "att",
                "--uncertainty", tmp_path / "unc.nii.gz", "-q") == 0
    reference = read_image(image)
    seg = read_image(out)
    assert seg.shape == reference.shape and seg.same_geometry(reference)
    maps = sorted((tmp_path / "att").glob("attention_*.nii.gz"))
    assert maps
    for path in maps + [tmp_path / "unc.nii.gz"]:
        assert read_image(path).same_geometry(reference)


def test_points_keep_only_the_components_at_the_points(image, checkpoint, tmp_path):
    full, clicked = tmp_path / "full.nii.gz", tmp_path / "clicked.nii.gz"
    assert _run("segment", image, "-o", full, "--model", checkpoint, "-q") == 0
    labels = read_image(full).array
    if not labels.any():
        pytest.skip("the untrained network predicted no foreground for this seed")
    k, j, i = np.argwhere(labels > 0)[0]
    assert _run("segment", image, "-o", clicked, "--model", checkpoint, "--point-ijk", f"{i},{j},{k}",
                "-q") == 0
    kept = read_image(clicked).array
    assert kept[k, j, i] > 0
    assert (kept > 0).sum() <= (labels > 0).sum()
    assert not (kept > 0)[labels == 0].any()


def _fails(capsys, *args) -> str:
    code = _run(*args)
    assert code == 2
    return capsys.readouterr().err


def test_missing_image_is_named_and_nothing_is_written(capsys, checkpoint, tmp_path):
    out = tmp_path / "seg.nii.gz"
    err = _fails(capsys, "segment", tmp_path / "absent.nii.gz", "-o", out, "--model", checkpoint)
    assert "absent.nii.gz" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unreadable_image_is_named(capsys, checkpoint, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    out = tmp_path / "seg.nii.gz"
    err = _fails(capsys, "segment", bad, "-o", out, "--model", checkpoint)
    assert "bad.nii.gz" in err and not out.exists()


def test_two_d_image_for_a_three_d_model(capsys, checkpoint, tmp_path):
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.float32)), str(flat))
    err = _fails(capsys, "segment", flat, "-o", tmp_path / "seg.nrrd", "--model", checkpoint)
    assert "2D image" in err and not (tmp_path / "seg.nrrd").exists()


def test_unknown_model(capsys, image, tmp_path):
    err = _fails(capsys, "segment", image, "-o", tmp_path / "seg.nii.gz", "--model", "no_such_model")
    assert "no_such_model" in err and not (tmp_path / "seg.nii.gz").exists()


def test_corrupt_checkpoint(capsys, image, tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00" * 100)
    err = _fails(capsys, "segment", image, "-o", tmp_path / "seg.nii.gz", "--model", bad)
    assert "corrupt.pt" in err and not (tmp_path / "seg.nii.gz").exists()


def test_point_outside_the_image(capsys, image, checkpoint, tmp_path):
    err = _fails(capsys, "segment", image, "-o", tmp_path / "seg.nii.gz", "--model", checkpoint,
                 "--point-ijk", "500,1,1")
    assert "outside" in err and not (tmp_path / "seg.nii.gz").exists()


def test_output_may_not_overwrite_the_input(capsys, image, checkpoint):
    before = image.read_bytes()
    err = _fails(capsys, "segment", image, "-o", image, "--model", checkpoint)
    assert "overwrite" in err and image.read_bytes() == before


def test_ras_points_are_converted_through_the_image_geometry(image, checkpoint, tmp_path):
    volume = read_image(image)
    ras = volume.ijk_to_ras(np.array([3.0, 4.0, 5.0]))
    out = tmp_path / "seg.nii.gz"
    # "--point-ras=..." because RAS coordinates are often negative (argparse would
    # take "-12,..." for an option).
    assert _run("segment", image, "-o", out, "--model", checkpoint,
                "--point-ras=" + ",".join(f"{v:.4f}" for v in ras), "-q") == 0


def test_console_command_runs_as_a_real_process(image, checkpoint, tmp_path):
    out = tmp_path / "seg.mha"
    proc = subprocess.run([sys.executable, "-m", "AttentionSegLib", "segment", str(image), "-o", str(out),
                           "--model", str(checkpoint), "-q"], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert read_image(out).same_geometry(read_image(image))
    bad = subprocess.run([sys.executable, "-m", "AttentionSegLib", "segment", str(tmp_path / "nope.nii"),
                          "-o", str(tmp_path / "x.nii.gz"), "--model", str(checkpoint)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "nope.nii" in bad.stderr


def test_help_explains_every_command():
    proc = subprocess.run([sys.executable, "-m", "AttentionSegLib", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0
    for command in ("demo", "segment", "train", "evaluate", "models"):
        assert command in proc.stdout


@pytest.mark.shared_data
def test_segment_the_real_ct_keeps_its_flipped_geometry(example_ct, checkpoint, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert _run("segment", example_ct, "-o", out, "--model", checkpoint, "--attention-dir", tmp_path / "att",
                "-q") == 0
    reference = sitk.ReadImage(str(example_ct))
    for path in [out, *sorted((tmp_path / "att").glob("*.nii.gz"))]:
        written = sitk.ReadImage(str(path))
        assert written.GetSize() == reference.GetSize()
        assert written.GetSpacing() == reference.GetSpacing()
        assert written.GetOrigin() == reference.GetOrigin()
        assert written.GetDirection() == reference.GetDirection()
    assert reference.GetDirection()[0] < 0, "the fixture's direction flips the first axis"


@pytest.mark.shared_data
def test_segment_a_dicom_series_folder(example_ct_dicom, checkpoint, tmp_path):
    out = tmp_path / "seg.nrrd"
    assert _run("segment", example_ct_dicom, "-o", out, "--model", checkpoint, "--point-ijk", "256,256,10",
                "--roi", "-q") == 0
    reference = read_image(example_ct_dicom)
    assert read_image(out).same_geometry(reference)
