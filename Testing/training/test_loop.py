"""The training loop: trains from a dataset folder, validates, checkpoints, resumes, runs under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from AttentionSegLib import heap
from AttentionSegLib.checkpoint import load_checkpoint
from AttentionSegLib.phantom import make_phantom_dataset
from AttentionSegLib.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return Path(make_phantom_dataset(tmp_path_factory.mktemp("data") / "phantoms", n_cases=3, seed=5,
                                     shape=(16, 48, 48)))


def _config(data: Path, output: Path, **kw) -> TrainConfig:
    values = dict(data=str(data), output=str(output), network="attention_unet",
                  network_config={"filters": [4, 8, 16, 32, 64]}, patch_size=[16, 32, 32], batch_size=1,
                  iterations=4, validate_every=2, checkpoint_every=2, validation=1,
                  normalization={"kind": "ct_window", "window": [-200, 300]}, device="cpu")
    values.update(kw)
    return TrainConfig.from_dict(values)


def test_training_writes_checkpoints_with_provenance(phantoms, tmp_path):
    result = train(_config(phantoms, tmp_path / "run"), progress=False)
    assert result.iterations == 4
    assert len(result.history) == 2
    assert 0.0 <= result.best_metric <= 1.0
    model = load_checkpoint(result.best_model)
    assert model.provenance["iterations"] in (2, 4)
    assert model.preprocessing["normalization"]["kind"] == "ct_window"
    assert model.labels, "label names from dataset.json"
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert log["iterations"] == 4


def test_training_changes_the_weights_and_reduces_the_loss(phantoms, tmp_path):
    config = _config(phantoms, tmp_path / "run", iterations=30, validate_every=1000, checkpoint_every=1000,
                     learning_rate=3e-3, validation=0)
    from AttentionSegLib.datasets import list_cases
    from AttentionSegLib.networks import build_network
    from AttentionSegLib.training.regimes import make_regime

    torch.manual_seed(0)
    files = list_cases(phantoms)
    regime = make_regime(config, files, config.preprocessing())
    net = build_network("attention_unet", spatial_dims=3, in_channels=1,
                        out_channels=max(regime.label_values()) + 1, filters=[4, 8, 16, 32, 64])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for it in range(30):
        opt.zero_grad()
        loss, _ = regime.loss(net, net, torch.device("cpu"), it)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.skipif(not heap.available(), reason="glibc's malloc is not this process's allocator")
def test_the_steps_keep_freed_memory_for_reuse(phantoms, tmp_path, monkeypatch):
    """Every step allocates the same maps again: training runs within ``heap.reuse_freed_memory`` (the steps
    are timed both ways by ``benchmarks/training_speed.py``), and leaves it when it ends."""
    from AttentionSegLib.training import loop

    seen: list[bool] = []
    make_regime = loop.make_regime

    def recording(*args, **kwargs):
        regime = make_regime(*args, **kwargs)
        loss = regime.loss

        def recorded(*a, **k):
            seen.append(heap.active())
            return loss(*a, **k)

        regime.loss = recorded
        return regime

    monkeypatch.setattr(loop, "make_regime", recording)
    assert not heap.active()
    train(_config(phantoms, tmp_path / "run", iterations=2, validate_every=1000), progress=False)
    assert seen == [True, True]
    assert not heap.active()


def test_resume_continues_from_the_saved_iteration(phantoms, tmp_path):
    out = tmp_path / "run"
    train(_config(phantoms, out, iterations=2), progress=False)
    result = train(_config(phantoms, out, iterations=4, resume=True), progress=False)
    assert result.iterations == 4
    state = torch.load(out / "training_state.pt", weights_only=False)
    assert state["iteration"] == 4
    assert [h["iteration"] for h in result.history] == [2, 4]


def test_cancel_stops_and_saves(phantoms, tmp_path):
    class Stop:
        def is_set(self):
            return True

    result = train(_config(phantoms, tmp_path / "run", iterations=50), progress=False, cancel=Stop())
    assert result.cancelled and result.iterations == 0
    assert (tmp_path / "run" / "training_state.pt").exists()


@pytest.mark.slow
def test_ddp_on_gloo_with_two_processes_keeps_replicas_in_sync(phantoms, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "AttentionSegLib.cli", "train", "--data", str(phantoms), "-o", str(out), "--device", "cpu",
           "--network-config", '{"filters": [4, 8, 16, 32, 64]}', "--patch-size", "16,32,32", "--batch-size",
           "1", "--iterations", "3", "--validate-every", "3", "--validation", "1", "--threads", "1", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    assert log["world_size"] == 2
    assert log["replicas_in_sync"] is True
    assert load_checkpoint(out / "model_last.pt").provenance["world_size"] == 2


def test_click_conditioned_training_gives_a_network_with_click_channels(phantoms, tmp_path):
    result = train(_config(phantoms, tmp_path / "run", click_channels=True, iterations=2, validate_every=2),
                   progress=False)
    model = load_checkpoint(result.last_model)
    assert model.in_channels == 3, "image + positive + negative click maps"
    assert model.network_config["in_channels"] == 3
    assert result.history and 0.0 <= result.history[-1]["dice_mean"] <= 1.0, "validated without clicks"


def test_click_channels_need_dense_labels(phantoms, tmp_path):
    with pytest.raises(ValueError, match="supervised regime"):
        _config(phantoms, tmp_path / "run", click_channels=True, regime="scribble").validate()


def test_the_click_regime_feeds_the_clicks_it_simulates(phantoms):
    from AttentionSegLib.datasets import list_cases
    from AttentionSegLib.training.regimes import make_regime

    config = _config(phantoms, Path("unused"), click_channels=True,
                     regime_options={"p_no_clicks": 0.0, "click_radius": 0})  # a click is one voxel
    regime = make_regime(config, list_cases(phantoms), config.preprocessing())
    images, targets = regime.sampler.batch(4)
    batch = regime.with_clicks(images, targets)
    assert batch.shape[1] == 3 and torch.equal(batch[:, :1], images)
    positive = batch[:, 1] > 0
    has_foreground = (targets > 0).flatten(1).any(1)
    assert positive.flatten(1).any(1).tolist() == has_foreground.tolist()
    assert bool((targets[positive] > 0).all()), "positive clicks on the structures"
    assert bool((targets[batch[:, 2] > 0] == 0).all()), "negative clicks on the background"


def _scribble_data(phantoms: Path, tmp_path: Path) -> Path:
    from AttentionSegLib.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path / "scribbled", n_cases=2, seed=5, shape=(16, 48, 48), scribbles=True)


def test_steps_with_non_finite_gradients_are_skipped_and_the_weights_stay_finite(phantoms, tmp_path):
    data = _scribble_data(phantoms, tmp_path)
    config = _config(data, tmp_path / "run", regime="scribble", iterations=3, validation=0,
                     regime_options={"losses": "attenscribble", "crf_weight": float("nan"), "crf_radius": 1})
    train(config, progress=False)
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert log["skipped_steps"] == 3
    state = torch.load(tmp_path / "run" / "training_state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["network"].values() if v.is_floating_point())


def test_training_that_keeps_diverging_stops_with_a_clear_error(phantoms, tmp_path):
    from AttentionSegLib.training.loop import MAX_BAD_STEPS, TrainingDiverged

    data = _scribble_data(phantoms, tmp_path)
    config = _config(data, tmp_path / "run", regime="scribble", iterations=MAX_BAD_STEPS + 5, validation=0,
                     checkpoint_every=10,
                     regime_options={"losses": "attenscribble", "crf_weight": float("nan"), "crf_radius": 1})
    with pytest.raises(TrainingDiverged, match=f"not finite for {MAX_BAD_STEPS} steps"):
        train(config, progress=False)
    assert (tmp_path / "run" / "training_state.pt").is_file(), "the last good state stays for --resume"
