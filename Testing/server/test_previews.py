"""A click's structure as it grows, over HTTP: the job keeps its newest preview, a status carries it when the
client asks for a newer one, and the Slicer module's ``RemoteBackend`` hands it to ``Job.preview``.

The job-level tests use the server's own :class:`ServerJob` (real threads, no network); the last ones run
LiteMedSAM on the real example CT in a real ``attentionseg serve`` process on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from remote_helpers import TOKEN, ServerProcess, running_server

from AttentionSegLib import ServerError, Volume
from AttentionSegLib.server.jobs import RUNNING, SUCCEEDED, ServerJob
from AttentionSegLib.server.patches import preview_mask

WAIT_S = 300.0


def _running_job() -> ServerJob:
    job = ServerJob("session", "Click", lambda job: None)
    job.state = RUNNING  # as the device queue sets it
    return job


def test_a_job_keeps_its_newest_preview_and_a_status_carries_it_only_when_asked_for_a_newer_one() -> None:
    job = _running_job()
    mask = np.zeros((5, 8, 9), dtype=bool)
    mask[2, 3:5, 4:7] = True
    assert "preview" not in job.status(None, 0)  # none yet
    job.show_preview(3, mask)
    assert "preview" not in job.status(None)  # not asked for
    shown = job.status(None, 0)["preview"]
    assert (shown["version"], shown["label"], shown["start"]) == (1, 3, [2, 3, 4])
    assert shown["data"].dtype == np.uint8 and shown["data"].shape == (1, 2, 3)  # the box of its voxels
    version, label, back = preview_mask(mask.shape, shown)
    assert (version, label) == (1, 3) and np.array_equal(back, mask)
    assert "preview" not in job.status(None, 1)  # the client has it already

    job.show_preview(3, np.zeros_like(mask))  # a structure can be empty (its slice decided as nothing)
    shown = job.status(None, 1)["preview"]
    assert shown["version"] == 2 and shown["data"].shape == (0, 0, 0)
    assert not preview_mask(mask.shape, shown)[2].any()

    job.finish(SUCCEEDED, result=mask.astype(np.uint8))
    assert "preview" not in job.status(None, 0)  # a finished job answers with its result instead


def test_a_long_poll_for_a_preview_returns_when_one_comes_or_the_job_ends() -> None:
    job = _running_job()
    mask = np.ones((2, 3, 4), dtype=bool)
    timer = threading.Timer(0.3, job.show_preview, args=(1, mask))
    timer.start()
    started = time.monotonic()
    job.wait(60.0, preview_after=0)
    assert time.monotonic() - started < 30.0, "the wait did not end when the preview came"
    assert job.status(None, 0)["preview"]["version"] == 1
    timer.join()

    started = time.monotonic()
    job.wait(0.2, preview_after=1)  # nothing newer: waits out its time
    assert time.monotonic() - started >= 0.15 and "preview" not in job.status(None, 1)

    threading.Timer(0.3, job.finish, args=(SUCCEEDED,)).start()
    started = time.monotonic()
    job.wait(60.0, preview_after=1)
    assert time.monotonic() - started < 30.0 and job.state == SUCCEEDED


@pytest.mark.parametrize("packet", [
    {"version": 1, "label": 1, "start": [0, 0, 3], "data": np.ones((1, 1, 2), np.uint8)},  # beyond the grid
    {"version": 1, "label": 1, "start": [0, 0, 0], "data": np.ones((1, 1, 2), np.float32)},  # not uint8
    {"version": 1, "label": 1, "start": [0, 0], "data": np.ones((1, 1, 2), np.uint8)},  # wrong rank
    {"version": "1", "label": 1, "start": [0, 0, 0], "data": np.ones((1, 1, 2), np.uint8)},
    [1, 2, 3],
])
def test_a_preview_that_does_not_fit_the_grid_is_refused(packet: Any) -> None:
    with pytest.raises(ValueError, match="preview"):
        preview_mask((2, 3, 4), packet)


# ------------------------------------------------------------------------------- LiteMedSAM on a real server


@pytest.fixture(scope="module")
def spleen(medsam_weights: Path, ct_organ_slices: Callable[..., tuple[Volume, np.ndarray]]
           ) -> tuple[Volume, np.ndarray]:
    """Every second axial slice through the spleen of the example CT, whole slices."""
    return ct_organ_slices("spleen")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("server"), token=TOKEN) as running:
        yield running


def _deepest_voxel(truth: np.ndarray) -> tuple[int, int, int]:
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(truth)
    k, j, i = np.unravel_index(int(np.argmax(depth)), truth.shape)
    return int(i), int(j), int(k)


@pytest.mark.slow
@pytest.mark.shared_data
def test_remote_backend_shows_a_litemedsam_click_as_it_grows_and_a_cancel_there_changes_nothing(
    server: ServerProcess, spleen: tuple[Volume, np.ndarray],
) -> None:
    """Through ``RemoteBackend`` (the Slicer module's seam, no Slicer needed): while the server propagates the
    click, ``Job.preview`` shows the structure so far, the first preview the clicked slice alone, each one
    inside the answer that comes back; a second click cancelled at its first preview leaves the server's
    mask as it was. With ``preview_every_s=0`` the client sees the previews of one job in order."""
    from AttentionSegBackend import JobState, SessionCall
    from AttentionSegRemoteBackend import RemoteBackend

    image, truth = spleen
    point = _deepest_voxel(truth)
    backend = RemoteBackend(server.url, TOKEN, poll_s=0.1)
    try:
        opened = backend.open_session(image, "medsam_lite")
        assert opened.wait(WAIT_S) and opened.state is JobState.SUCCEEDED, opened.error_message

        job = backend.run("Click", [SessionCall.click(point, label=2)])
        seen: list[tuple[int, int, np.ndarray]] = []
        while not job.wait(0.05):
            current = job.preview
            if current is not None and (not seen or current[0] != seen[-1][0]):
                seen.append(current)
        assert job.state is JobState.SUCCEEDED, job.error_message
        answer = np.asarray(job.result()) == 2
        assert 2 * (answer & truth).sum() / (answer.sum() + truth.sum()) >= 0.8
        assert len(seen) >= 2, f"{len(seen)} previews seen during a click of {job.message!r}"
        assert [v for v, _, _ in seen] == sorted({v for v, _, _ in seen})  # newer ones only
        assert all(label == 2 and mask.shape == image.shape for _, label, mask in seen)
        assert all((mask <= answer).all() for _, _, mask in seen)
        assert [int(m.any(axis=(1, 2)).sum()) for _, _, m in seen] == sorted(
            int(m.any(axis=(1, 2)).sum()) for _, _, m in seen)  # it grows slice by slice
        first_version, _, first = seen[0]
        if first_version == 1:
            assert np.nonzero(first.any(axis=(1, 2)))[0].tolist() == [point[2]] and first[point[::-1]]

        # A click on a new label, cancelled as soon as its first preview shows: nothing changes on the server.
        job = backend.run("Click", [SessionCall.click(point, label=3)])
        while job.preview is None and not job.wait(0.02):
            pass
        job.cancel()
        assert job.wait(WAIT_S) and job.state is JobState.CANCELLED
        for name, call in (("Undo", SessionCall.undo()), ("Redo", SessionCall.redo())):
            step = backend.run(name, [call])
            assert step.wait(WAIT_S) and step.state is JobState.SUCCEEDED, step.error_message
            if name == "Undo":  # one undo goes back before the first click: the cancelled one left no step
                assert not np.asarray(step.result()).any()
        assert np.array_equal(np.asarray(step.result()), np.where(answer, 2, 0))
    finally:
        backend.shutdown()


@pytest.mark.slow
@pytest.mark.shared_data
def test_a_client_sees_the_previews_it_asks_a_server_for_and_a_bad_interval_is_refused(
    server: ServerProcess, spleen: tuple[Volume, np.ndarray],
) -> None:
    image, truth = spleen
    point = _deepest_voxel(truth)
    session = server.client().open_session(image, "medsam_lite")
    try:
        with pytest.raises(ServerError, match="preview_every_s"):
            session.call([("click", (point,), {"label": 1})], preview=lambda label, mask: None,
                         preview_every_s=-1.0)
        assert "previews" in session.features and "previews" in server.client().health()["features"]
        looks: list[tuple[int, np.ndarray]] = []
        answer = session.call([("click", (point,), {"label": 1})],
                              preview=lambda label, mask: looks.append((label, mask)), preview_every_s=0.0)
        assert looks and all(label == 1 and (mask <= (answer == 1)).all() for label, mask in looks)
        plain = server.client().open_session(image, "medsam_lite")
        try:
            plain.features = frozenset()  # as a server before previews says: the client asks for none
            unseen: list[int] = []
            answered = plain.call([("click", (point,), {"label": 1})], preview=lambda label, mask:
                                  unseen.append(label), preview_every_s=0.0)
            assert np.array_equal(answered, answer) and not unseen
        finally:
            plain.close()
    finally:
        session.close()
