"""``attentionseg`` workflows end to end on small generated data: phantom, train (every regime), evaluate,
refine, models, demo. Bad inputs exit 2 with a message naming the file and leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from AttentionSegLib.checkpoint import load_checkpoint, save_checkpoint
from AttentionSegLib.cli import main
from AttentionSegLib.imageio import read_image, write_image
from AttentionSegLib.metrics import dice
from AttentionSegLib.model_zoo import available_models
from AttentionSegLib.networks import build_network
from AttentionSegLib.volume import Volume

TINY = '{"filters": [4, 8, 16, 32, 64]}'


def _run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four small phantoms with labels and simulated scribbles, written by the CLI itself."""
    folder = tmp_path_factory.mktemp("data") / "phantoms"
    assert _run("phantom", folder, "--cases", "4", "--seed", "3", "--scribbles") == 0
    return folder


def test_phantom_writes_images_labels_and_scribbles(data):
    for sub in ("imagesTr", "labelsTr", "scribblesTr"):
        assert len(list((data / sub).glob("*.nii.gz"))) == 4
    labels = read_image(data / "labelsTr" / "case_000.nii.gz")
    scribbles = read_image(data / "scribblesTr" / "case_000.nii.gz")
    assert scribbles.same_geometry(labels)
    drawn = scribbles.array != 255
    assert 0 < drawn.mean() < 0.05, "sparse strokes"
    assert np.array_equal(scribbles.array[drawn], labels.array[drawn]), "every stroke lies on its own label"


def _train(data: Path, out: Path, *extra: str) -> Path:
    code = _run("train", "--data", data, "-o", out, "--network-config", TINY, "--iterations", "2",
                "--batch-size", "1", "--validate-every", "2", "--validation", "case_003", "--device", "cpu",
                "-q", "--normalization", '{"kind": "ct_window", "window": [-200, 300]}', *extra)
    assert code == 0
    return out / "model_last.pt"


@pytest.mark.parametrize("regime, extra", [
    ("supervised", ["--spatial-dims", "3", "--patch-size", "16,32,32"]),
    ("scribble",
     ["--spatial-dims", "3", "--patch-size", "16,32,32", "--regime-options", '{"losses": "pce"}']),
    ("scribble", ["--spatial-dims", "2", "--patch-size", "32,32",
                  "--regime-options", '{"losses": "attenscribble", "crf_radius": 2}']),
    ("semi", ["--spatial-dims", "2", "--patch-size", "32,32", "--labelled", "case_000",
              "--regime-options", '{"method": "attention_perturbation"}']),
    ("semi", ["--spatial-dims", "3", "--patch-size", "16,32,32", "--labelled", "case_00[01]",
              "--regime-options", '{"method": "supervised_only"}']),
], ids=["supervised-3d", "scribble-pce-3d", "scribble-attenscribble-2d", "semi-aigc-2d", "semi-baseline-3d"])
def test_every_regime_trains_from_the_command_line(data, tmp_path, regime, extra):
    checkpoint = _train(data, tmp_path / "run", "--regime", regime, *extra)
    model = load_checkpoint(checkpoint)
    assert model.spatial_dims == int(extra[1])
    assert model.provenance["config"]["regime"] == regime
    assert "attentionseg train" in model.provenance["command"]
    assert model.labels[7] == "pancreas", "label names come from dataset.json"
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert log["iterations"] == 2 and log["history"], "validated"
    if "attenscribble" in " ".join(extra):
        assert model.network_config.get("self_attention_level"), "the pluggable self-attention is attached"


@pytest.fixture(scope="module")
def acdc_subset(acdc_dir, tmp_path_factory) -> Path:
    """Two ACDC patients (both frames) linked into an MSD-style folder: real images, labels and scribbles."""
    folder = tmp_path_factory.mktemp("acdc") / "acdc4"
    for sub in ("imagesTr", "labelsTr", "scribblesTr"):
        (folder / sub).mkdir(parents=True)
        for source in sorted((acdc_dir / sub).glob("patient02[12]_*.nii.gz")):
            (folder / sub / source.name).symlink_to(source.resolve())
    (folder / "dataset.json").symlink_to((acdc_dir / "dataset.json").resolve())
    assert len(list((folder / "imagesTr").iterdir())) == 4
    return folder


@pytest.mark.shared_data
@pytest.mark.parametrize("regime, options", [
    ("supervised", []),
    ("scribble", ["--regime-options", '{"losses": "pce"}']),
    ("scribble", ["--regime-options", '{"losses": "attenscribble", "crf_radius": 2}']),
    ("semi", ["--labelled", "patient021_.*", "--regime-options", '{"method": "supervised_only"}']),
    ("semi", ["--labelled", "patient021_.*", "--regime-options", '{"method": "attention_perturbation"}']),
], ids=["supervised", "scribble-pce", "scribble-attenscribble", "semi-baseline", "semi-aigc"])
def test_every_regime_trains_from_the_command_line_on_real_acdc(acdc_subset, tmp_path, regime, options):
    out = tmp_path / "run"
    code = _run("train", "--data", acdc_subset, "-o", out, "--regime", regime, "--network-config", TINY,
                "--spatial-dims", "2", "--patch-size", "64,64", "--iterations", "2", "--batch-size", "2",
                "--validate-every", "2", "--validation", "patient022_frame11", "--device", "cpu", "-q",
                "--normalization", '{"kind": "minmax"}', *options)
    assert code == 0
    model = load_checkpoint(out / "model_last.pt")
    assert model.provenance["config"]["regime"] == regime
    assert model.labels == {1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"}
    log = json.loads((out / "training_log.json").read_text())
    assert log["iterations"] == 2
    assert log["history"], "validated on the held-out frame"
    assert 0.0 <= log["history"][-1]["dice_mean"] <= 1.0


def test_evaluate_reports_dice_and_hd95_per_label(data, tmp_path):
    checkpoint = _train(data, tmp_path / "run", "--spatial-dims", "3", "--patch-size", "16,32,32")
    report_path = tmp_path / "report.json"
    assert _run("evaluate", data, "--model", checkpoint, "--cases", "case_00[23]", "-o", report_path,
                "-q") == 0
    report = json.loads(report_path.read_text())
    assert [c["case"] for c in report["cases"]] == ["case_002", "case_003"]
    assert {"dice_pancreas", "hd95_pancreas", "dice_mean", "hd95_mean"} <= set(report["summary"])
    assert 0.0 <= report["summary"]["dice_mean"] <= 1.0
    # The labels themselves as predictions: perfect scores.
    assert _run("evaluate", data, "--predictions", data / "labelsTr", "-o", report_path, "-q") == 0
    perfect = json.loads(report_path.read_text())["summary"]
    assert perfect["dice_mean"] == pytest.approx(1.0) and perfect["hd95_mean"] == pytest.approx(0.0)


def test_evaluate_refuses_a_model_and_predictions_together(data, capsys):
    assert _run("evaluate", data, "--model", "x.pt", "--predictions", data / "labelsTr") == 2
    assert "exactly one" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- refine


@pytest.fixture()
def round0(data, tmp_path):
    image = data / "imagesTr" / "case_000.nii.gz"
    labels = read_image(data / "labelsTr" / "case_000.nii.gz")
    binary = np.where(labels.array == 1, 1, 0)  # the liver against everything else
    scribbles = read_image(data / "scribblesTr" / "case_000.nii.gz").array
    strokes = np.where(scribbles == 255, 255, np.where(scribbles == 1, 1, 0)).astype(np.uint8)
    path = write_image(labels.with_array(strokes), tmp_path / "round0.nii.gz")
    return image, path, binary


def test_refine_rounds_chain_from_the_shell(round0, tmp_path):
    image, scribbles, truth = round0
    seg1, adapted = tmp_path / "seg1.nii.gz", tmp_path / "adapted.pt"
    assert _run("refine", image, "--scribbles", scribbles, "-o", seg1, "--time-budget", "2", "--strategy",
                "finetune", "--save-model", adapted, "--device", "cpu", "-q") == 0
    first = read_image(seg1)
    assert first.same_geometry(read_image(image))
    strokes = read_image(scribbles).array
    assert np.array_equal(first.array[strokes != 255], strokes[strokes != 255]), "scribbles are honoured"
    model = load_checkpoint(adapted)
    assert model.provenance["adaptation"]["refine_steps"] > 0
    seg2 = tmp_path / "seg2.nii.gz"
    assert _run("refine", image, "--scribbles", scribbles, "--init", seg1, "--model", adapted, "-o", seg2,
                "--time-budget", "1", "--device", "cpu", "-q") == 0
    assert read_image(seg2).same_geometry(first)


def test_refine_on_a_cpu_uses_the_online_head_and_says_so(round0, tmp_path, capsys):
    image, scribbles, truth = round0
    out = tmp_path / "seg.nii.gz"
    assert _run("refine", image, "--scribbles", scribbles, "-o", out, "--device", "cpu") == 0
    assert "refined with online_head" in capsys.readouterr().out
    result = read_image(out)
    assert result.same_geometry(read_image(image))
    strokes = read_image(scribbles).array
    assert np.array_equal(result.array[strokes != 255], strokes[strokes != 255]), "scribbles are honoured"
    assert dice(result.array == 1, truth == 1) > 0.5


def test_refine_strategies_offered_by_the_cli_are_the_sessions():
    from AttentionSegLib.cli import REFINE_STRATEGIES
    from AttentionSegLib.interactive.settings import STRATEGIES

    assert tuple(REFINE_STRATEGIES) == tuple(STRATEGIES)


def _refuses(capsys, *args, output: Path, naming: str, says: str) -> None:
    assert _run(*args) == 2
    err = capsys.readouterr().err
    assert naming in err and says in err, err
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}*")), "no temporary file left behind"


def test_refine_bad_inputs_fail_cleanly(round0, tmp_path, capsys):
    image, scribbles, _ = round0
    out = tmp_path / "out.nii.gz"
    volume = read_image(scribbles)
    other_grid = write_image(Volume(volume.array[:, :-1], volume.spacing, volume.origin, volume.direction),
                             tmp_path / "other_grid.nii.gz")
    _refuses(capsys, "refine", image, "--scribbles", other_grid, "-o", out, output=out,
             naming="other_grid.nii.gz", says="another grid")
    empty = write_image(volume.with_array(np.full(volume.shape, 255, np.uint8)), tmp_path / "empty.nii.gz")
    _refuses(capsys, "refine", image, "--scribbles", empty, "-o", out, output=out, naming="empty.nii.gz",
             says="no scribbles")
    net = build_network("attention_unet", spatial_dims=3, in_channels=1, out_channels=2,
                        filters=[4, 8, 16, 32, 64])
    binary = save_checkpoint(tmp_path / "binary.pt", net, labels={1: "liver"}, preprocessing={
        "normalization": {"kind": "zscore"}, "spacing": None, "patch_size": [16, 32, 32]})
    many = volume.array.copy()
    many[0, 0, :3] = 5
    unknown = write_image(volume.with_array(many), tmp_path / "unknown_label.nii.gz")
    _refuses(capsys, "refine", image, "--scribbles", unknown, "--model", binary, "-o", out, output=out,
             naming="unknown_label.nii.gz", says="5")
    _refuses(capsys, "refine", image, "--scribbles", scribbles, "-o", scribbles,
             output=tmp_path / "none.nii.gz", naming="round0.nii.gz", says="overwrite")


# ----------------------------------------------------------------------------------------------------- models


def test_models_import_list_and_info(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTENTIONSEG_HOME", str(tmp_path / "home"))
    net = build_network("attention_unet", spatial_dims=3, in_channels=1, out_channels=2,
                        filters=[4, 8, 16, 32, 64])
    checkpoint = save_checkpoint(tmp_path / "mine.pt", net, labels={1: "tumour"}, preprocessing={
        "normalization": {"kind": "zscore"}, "spacing": None, "patch_size": [16, 32, 32]})
    assert _run("models", "import", "my_model", checkpoint, "--description", "a test model") == 0
    assert "my_model" in available_models()
    capsys.readouterr()
    assert _run("models") == 0
    assert "my_model" in capsys.readouterr().out
    assert _run("models", "info", "my_model") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == {"1": "tumour"} and info["parameters"] > 0
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"nope")
    assert _run("models", "import", "broken", corrupt) == 2
    assert "broken" not in available_models()


def test_models_info_medsam_lite_says_its_provenance_and_its_options(capsys):
    """Without its weights too: the entry then says how to install them."""
    from AttentionSegLib.interactive.medsam import MedSAMSettings
    from AttentionSegLib.networks.medsam_lite.weights import SHA256

    capsys.readouterr()
    assert _run("models", "info", "medsam_lite") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "medsam_lite" and info["sha256"] == SHA256 and info["licence"] == "Apache-2.0"
    assert info["model_options"] == MedSAMSettings().to_dict()
    assert info["weights"].endswith("lite_medsam.pth") or "--no-deps" in info["weights"]


@pytest.mark.parametrize(("options", "says"), [
    ('{"slice_gap": 0}', "unknown LiteMedSAM option(s) ['slice_gap']"),
    ('{"slice_gap_mm": "six"}', "'slice_gap_mm' must be a number"),
    ("[1, 2]", "must be a JSON object of settings"),
    ("{slice_gap_mm: 0}", "not valid JSON"),
    ("absent.json", "cannot read it"),
])
def test_bad_model_options_are_refused_before_any_work(tmp_path, capsys, options, says):
    image = write_image(Volume(np.zeros((4, 16, 16), np.int16)), tmp_path / "ct.nii.gz")
    out = tmp_path / "seg.nii.gz"
    if options.endswith(".json"):
        options = str(tmp_path / options)
    capsys.readouterr()
    code = _run("segment", image, "-o", out, "--model", "medsam_lite", "--point-ijk", "8,8,2",
                "--model-options", options, "-q")
    err = capsys.readouterr().err
    assert code == 2 and "--model-options" in err and says in err, err
    assert not out.exists()


def test_model_options_are_litemedsams_alone(tmp_path, capsys):
    image = write_image(Volume(np.zeros((4, 16, 16), np.int16)), tmp_path / "ct.nii.gz")
    capsys.readouterr()
    code = _run("segment", image, "-o", tmp_path / "seg.nii.gz", "--model", "demo_abdomen_ct",
                "--model-options", '{"slice_gap_mm": 0}', "-q")
    assert code == 2 and "only --model medsam_lite takes model options" in capsys.readouterr().err
    assert not (tmp_path / "seg.nii.gz").exists()


# ------------------------------------------------------------------------------------------------------- demo


def test_demo_segments_the_phantom_with_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _run("demo", "-o", out, "--device", "cpu", "-q") == 0
    printed = capsys.readouterr().out
    for name in ("phantom_ct.nii.gz", "segmentation.nii.gz", "uncertainty.nii.gz", "overview.png"):
        assert (out / name).is_file(), name
    maps = sorted(out.glob("attention_*.nii.gz"))
    assert maps, "attention maps"
    ct = read_image(out / "phantom_ct.nii.gz")
    for path in [out / "segmentation.nii.gz", *maps]:
        assert read_image(path).same_geometry(ct)
    assert "Dice liver" in printed
    liver = float(printed.split("Dice liver")[1].split()[0])
    assert liver > 0.8, "the bundled model finds the liver of a phantom it never saw"
    from PIL import Image

    with Image.open(out / "overview.png") as png:
        assert png.width > png.height > 0
