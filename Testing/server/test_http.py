"""The server over real HTTP on 127.0.0.1: token, refusals with a clear 4xx, limits, queue, and answers that
are exactly the engine's.

One server process (the command line, with a token, at most 3 sessions, 1 MiB uploads and a 64 MiB memory
bound) serves the whole module; raw requests go through ``http.client`` so that headers and bodies can be
wrong on purpose, everything else through the engine's own client.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from remote_helpers import (
    FAST_SETTINGS,
    TOKEN,
    ServerProcess,
    network,
    organ_voxel,
    running_server,
    scribbles_for,
)

from AttentionSegLib import InteractiveSession, RefineSettings, ServerError, load_checkpoint
from AttentionSegLib.server import PACKET_TYPE
from AttentionSegLib.server.client import JobCancelled
from AttentionSegLib.server.codec import encode

pytestmark = pytest.mark.slow
PANCREAS = 7
WAIT_S = 300.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("server"), "--max-sessions", "3", "--max-upload-mb", "1",
                        "--max-memory-mb", "64", token=TOKEN) as running:
        yield running


@pytest.fixture
def sessions(server: ServerProcess) -> Iterator[list[Any]]:
    """Remote sessions a test opens; all closed afterwards so that the next test finds the server empty."""
    opened: list[Any] = []
    yield opened
    for session in opened:
        session.close(quiet=True)


def open_session(server: ServerProcess, sessions: list[Any], phantom: Any, **settings: Any) -> Any:
    image, _, names = phantom
    session = server.client().open_session(image, network(names),
                                           options={"settings": {**FAST_SETTINGS, **settings}})
    sessions.append(session)
    return session


def raw(server: ServerProcess, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None, chunked: bool = False) -> tuple[int, dict[str, Any], Any]:
    """One request with exactly these headers: (status, JSON body, response headers)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        if chunked:
            chunks = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
            connection.request(method, path, body=chunks, headers=headers or {}, encode_chunked=True)
        else:
            connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data.startswith(b"{") else {}, response.headers
    finally:
        connection.close()


def authorised(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", **(extra or {})}


# -- token ---------------------------------------------------------------------------------------------------

ROUTES = [("GET", "/v1/health"), ("GET", "/v1/models"), ("POST", "/v1/sessions"), ("GET", "/v1/sessions/abc"),
          ("DELETE", "/v1/sessions/abc"), ("GET", "/v1/sessions/abc/mask"), ("POST", "/v1/sessions/abc/jobs"),
          ("GET", "/v1/jobs/abc"), ("POST", "/v1/jobs/abc/cancel")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(("header", "message"), [
    (None, "missing token"),
    (f"Bearer {TOKEN}x", "wrong token"),
    (f"Bearer {TOKEN[:-1]}", "wrong token"),
    (f"Basic {TOKEN}", "wrong token"),
    ("Bearer", "wrong token"),
])
def test_every_route_refuses_a_missing_or_wrong_token_with_401(server: ServerProcess, method: str, path: str,
                                                               header: str | None, message: str) -> None:
    headers = {"Authorization": header} if header is not None else {}
    body = encode({}) if method == "POST" else None
    status, answer, response_headers = raw(server, method, path, body,
                                           {**headers, "Content-Type": PACKET_TYPE})
    assert status == 401
    assert answer["detail"].startswith(message)
    assert response_headers["WWW-Authenticate"] == "Bearer"


def test_the_client_says_when_the_token_is_missing_or_wrong(server: ServerProcess) -> None:
    with pytest.raises(ServerError, match="401: missing token") as missing:
        server.client(token=None).health()
    assert missing.value.status == 401
    with pytest.raises(ServerError, match="401: wrong token"):
        server.client(token="not-the-token-0123456789").health()
    health = server.client().health()
    assert health["device"] == "cpu" and health["token_required"] is True and health["max_sessions"] == 3


# -- malformed and oversized payloads ------------------------------------------------------------------------


def test_a_body_that_is_not_a_packet_is_refused_with_its_reason(server: ServerProcess) -> None:
    status, answer, _ = raw(server, "POST", "/v1/sessions", b'{"image": 1}',
                            authorised({"Content-Type": "application/json"}))
    assert status == 415 and PACKET_TYPE in answer["detail"]

    status, answer, _ = raw(server, "POST", "/v1/sessions", b"ASEG\x01garbage",
                            authorised({"Content-Type": PACKET_TYPE}))
    assert status == 400 and "packet header of 1651663207 bytes exceeds the limit" in answer["detail"]


@pytest.mark.parametrize(("payload", "message"), [
    ({"image": 1}, "a new session needs"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": 3}, "'model' must be the name"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "no_such_model"},
     "unknown model 'no_such_model'"),
    ({"image": {"array": np.zeros(5, np.int16)}, "model": "demo_abdomen_ct"}, "2D or 3D array"),
    ({"image": {"array": np.full((4, 4, 4), np.nan, np.float32)}, "model": "demo_abdomen_ct"}, "NaN"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16), "direction": [1, 1, 0, 0, 1, 0, 0, 0, 1]},
      "model": "demo_abdomen_ct"}, "not an orthonormal matrix"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16), "spacing": ["1", 1, 1]}, "model": "demo_abdomen_ct"},
     "spacing must be a list of finite numbers"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "demo_abdomen_ct",
      "options": {"settings": {"strategy": "guess"}}}, "refine strategy must be one of"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "demo_abdomen_ct",
      "options": {"settings": {"colour": 1}}}, "unknown refine settings"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "demo_abdomen_ct",
      "options": {"settings": {"head_seconds": "1"}}}, "refine setting 'head_seconds' must be a number"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "demo_abdomen_ct",
      "options": {"settings": {"max_roi": [16, 48.5, 48]}}}, "'max_roi' must be a list of integers"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "demo_abdomen_ct",
      "options": {"max_history": 10_000}}, "max_history must be an integer 1..20"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "demo_abdomen_ct",
      "options": {"device": "cuda"}}, "'options' may hold"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "demo_abdomen_ct",
      "options": {"model_options": {"slice_gap_mm": 0}}}, "model_options are LiteMedSAM's"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "medsam_lite",
      "options": {"model_options": {"slice_gap": 0}}}, "unknown LiteMedSAM option(s) ['slice_gap']"),
    ({"image": {"array": np.zeros((4, 4, 4), np.int16)}, "model": "medsam_lite",
      "options": {"model_options": {"encoder_precision": "int4"}}}, "encoder_precision must be one of"),
])
def test_a_bad_session_request_is_refused_with_422_naming_what_is_wrong(server: ServerProcess, payload: dict,
                                                                        message: str) -> None:
    status, answer, _ = raw(server, "POST", "/v1/sessions", encode(payload),
                            authorised({"Content-Type": PACKET_TYPE}))
    assert status == 422, answer
    assert message in answer["detail"]
    assert server.client().health()["sessions"] == 0, "a refused request opens no session"


def test_a_model_path_is_never_read(server: ServerProcess, sessions: list[Any], phantom: Any,
                                    tmp_path: Path) -> None:
    checkpoint = tmp_path / "adapted.pt"
    checkpoint.write_bytes(open_session(server, sessions, phantom).call([("save_model", (), {})]))
    assert load_checkpoint(checkpoint).network_name == "attention_unet", "a real checkpoint is at that path"

    for model in (str(checkpoint), "../bundled_models/demo_abdomen_ct.pt", "/etc/passwd"):
        with pytest.raises(ServerError, match="422: unknown model .* never reads a path"):
            server.client().open_session(phantom[0], model)


def test_bad_calls_are_refused_with_422_and_queue_nothing(server: ServerProcess, sessions: list[Any],
                                                          phantom: Any) -> None:
    session = open_session(server, sessions, phantom)
    path = f"/v1/sessions/{session.id}/jobs"
    for calls, message in [
        ([{"method": "save_model", "args": ["/tmp/evil.pt"]}], "save_model takes no path"),
        ([{"method": "__class__"}], "unknown method"),
        ([{"method": "click", "args": [[1, 2, 3]], "kwargs": {"label": "x"}}], "label must be an integer"),
        ([{"method": "refine", "kwargs": {"scribbles": {"kind": "patch", "base": 0, "version": 1,
                                                       "start": [0, 0, 0],
                                                       "data": np.zeros((99, 1, 1), np.uint8)}}}],
         "does not lie inside the image grid"),
    ]:
        status, answer, _ = raw(server, "POST", path, encode({"calls": calls}),
                                authorised({"Content-Type": PACKET_TYPE}))
        assert status == 422 and message in answer["detail"], answer
    assert not Path("/tmp/evil.pt").exists()
    assert server.client()._json("GET", f"/sessions/{session.id}")["jobs"][-1]["name"] == "Start session"


def test_an_oversized_body_is_refused_with_413_whether_announced_or_streamed(server: ServerProcess) -> None:
    body = np.random.default_rng(0).bytes(3 << 19)  # 1.5 MiB, the limit is 1 MiB
    for chunked in (False, True):
        status, answer, _ = raw(server, "POST", "/v1/sessions", body,
                                authorised({"Content-Type": PACKET_TYPE}), chunked=chunked)
        assert status == 413, chunked
        assert "exceeds the server's limit of 1048576 bytes" in answer["detail"]
    assert server.client().health()["status"] == "ok", "the server lives on"


def test_the_client_refuses_an_image_beyond_the_upload_limit_before_sending_it(server: ServerProcess) -> None:
    from AttentionSegLib import Volume

    noise = Volume(np.random.default_rng(1).integers(-32768, 32767, size=(16, 256, 256), dtype=np.int16))
    with pytest.raises(ServerError, match="exceeds the server's upload limit of 1048576 bytes") as refused:
        server.client().open_session(noise, "demo_abdomen_ct")
    assert refused.value.status == 413


def test_unknown_sessions_and_jobs_are_404(server: ServerProcess) -> None:
    for method, path in [("GET", "/v1/sessions/0123/mask"), ("GET", "/v1/jobs/0123"),
                         ("POST", "/v1/jobs/0123/cancel"), ("DELETE", "/v1/sessions/0123")]:
        status, answer, _ = raw(server, method, path, headers=authorised())
        assert status == 404 and "unknown" in answer["detail"], (method, path, answer)


# -- bounds --------------------------------------------------------------------------------------------------


def test_the_number_of_sessions_is_bounded(server: ServerProcess, sessions: list[Any], phantom: Any) -> None:
    for _ in range(3):
        open_session(server, sessions, phantom)
    with pytest.raises(ServerError, match="503: the server has 3 open sessions, its maximum") as full:
        open_session(server, sessions, phantom)
    assert full.value.status == 503

    sessions.pop(0).close()
    open_session(server, sessions, phantom)
    assert server.client().health()["sessions"] == 3


def test_the_memory_of_the_sessions_is_bounded(server: ServerProcess, sessions: list[Any]) -> None:
    from AttentionSegLib import Volume

    big = Volume(np.zeros((64, 256, 256), np.int16))  # compresses to nothing, but needs ~300 MiB to work on
    with pytest.raises(ServerError, match="413: an image of shape .* needs about .* memory bound of 64 MiB"):
        server.client().open_session(big, network())
    assert server.client().health()["sessions"] == 0


# -- the engine's answers, remotely --------------------------------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The server runs torch on one thread; the local reference must too, for bit-equal answers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_remote_answers_are_exactly_the_local_engines(server: ServerProcess, sessions: list[Any],
                                                      phantom: Any, one_thread: None) -> None:
    image, labels, names = phantom
    # a budget the online head never reaches: it stops by its step count (or its band), not by the clock
    settings = {**FAST_SETTINGS, "head_seconds": 60.0}
    local = InteractiveSession(image, network(names), device="cpu", settings=RefineSettings(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}))
    remote = open_session(server, sessions, phantom, head_seconds=60.0)
    voxel = organ_voxel(labels.array, PANCREAS)
    scribbles = scribbles_for(labels.array, PANCREAS, voxel[2] + 1)

    assert remote.description["num_classes"] == local.num_classes == 8
    assert remote.description["labels"] == {str(k): v for k, v in names.items()}
    size = image.shape[::-1]  # (i, j, k)
    low = tuple(max(int(c) - 12, 0) for c in voxel)
    high = tuple(min(int(c) + 12, n - 1) for c, n in zip(voxel, size))
    steps = [("click", (voxel,), {"label": PANCREAS}),
             ("set_bounds", (low, high), {"label": PANCREAS}),
             ("refine", (), {"time_budget_s": 60.0, "scribbles": scribbles, "replace": True}),
             ("undo", (), {}), ("redo", (), {})]
    for method, args, kwargs in steps:
        expected = getattr(local, method)(*args, **kwargs)
        np.testing.assert_array_equal(remote.call([(method, args, kwargs)], name=method), expected,
                                      err_msg=method)
    maps = remote.call([("attention_maps", (), {})])
    expected_maps = local.attention_maps()
    assert set(maps) == set(expected_maps)
    for name, array in expected_maps.items():
        np.testing.assert_array_equal(maps[name], array, err_msg=name)
    np.testing.assert_array_equal(remote.call([("uncertainty", (), {})]), local.uncertainty())
    facts = remote.call([("describe", (), {})])
    assert facts["clicks"] == 1 and facts["scribbled_voxels"] == int((local.scribbles != 255).sum())
    assert facts["bounds"] == {str(PANCREAS): [list(low), list(high)]}


def test_an_engine_error_comes_back_as_the_same_exception(server: ServerProcess, sessions: list[Any],
                                                          phantom: Any) -> None:
    session = open_session(server, sessions, phantom)
    with pytest.raises(ValueError, match="label 9 is not one of this network's labels 1..7"):
        session.call([("click", ((10, 10, 5),), {"label": 9})], name="Click")
    with pytest.raises(ValueError, match="nothing to refine on"):
        session.call([("refine", (), {"time_budget_s": 1.0})], name="Refine")
    assert not session.call([("describe", (), {})])["can_undo"], "a failed step leaves nothing behind"


def test_patches_recover_from_a_lost_answer_or_request(server: ServerProcess, sessions: list[Any],
                                                       phantom: Any) -> None:
    _, labels, _ = phantom
    session = open_session(server, sessions, phantom)
    voxel = organ_voxel(labels.array, PANCREAS)
    clicked = session.call([("click", (voxel,), {"label": PANCREAS})])

    session.mask.version -= 1  # as if the answer of the click had been lost
    session.mask.array[:] = 0
    np.testing.assert_array_equal(session.call([("undo", (), {})]), np.zeros_like(clicked))
    np.testing.assert_array_equal(session.call([("redo", (), {})]), clicked)

    scribbles = scribbles_for(labels.array, PANCREAS, voxel[2])
    session.scribbles.version += 3  # as if a request had been lost after the client sent it
    session.call([("add_scribbles", (scribbles,), {"replace": True})])
    facts = session.call([("describe", (), {})])
    click_marks = facts["scribbled_voxels"] - int((scribbles != 255).sum())
    assert 0 <= click_marks <= 30, "the server holds the whole map the client painted, plus the click's disk"


def test_the_checkpoint_comes_back_in_the_answer(server: ServerProcess, sessions: list[Any], phantom: Any,
                                                 tmp_path: Path) -> None:
    data = open_session(server, sessions, phantom).call([("save_model", (), {})], name="Save model")
    assert isinstance(data, bytes)
    (tmp_path / "adapted.pt").write_bytes(data)
    assert load_checkpoint(tmp_path / "adapted.pt").labels[PANCREAS] == "pancreas"


# -- one job at a time ---------------------------------------------------------------------------------------


def test_jobs_queue_one_at_a_time_the_client_sees_its_place_and_cancel_stops_a_running_refine(
        server: ServerProcess, sessions: list[Any], phantom: Any) -> None:
    _, labels, _ = phantom
    slow = open_session(server, sessions, phantom, strategy="finetune", max_steps=10**6)
    other = open_session(server, sessions, phantom)
    voxel = organ_voxel(labels.array, PANCREAS)
    before = slow.call([("click", (voxel,), {"label": PANCREAS})])
    scribbles = scribbles_for(labels.array, PANCREAS, voxel[2])
    cancel_slow, outcomes, messages = threading.Event(), {}, []
    slow_running = threading.Event()

    def run(name: str, session: Any, calls: list, cancel: threading.Event | None,
            progress: Any = None) -> None:
        try:
            outcomes[name] = session.call(calls, name=name, cancel=cancel, progress=progress)
        except Exception as error:
            outcomes[name] = error

    def slow_progress(fraction: float, message: str) -> None:
        if not message.startswith(("queued", "waiting")):
            slow_running.set()

    refine = threading.Thread(target=run, args=("Refine", slow, [
        ("refine", (), {"time_budget_s": 600.0, "scribbles": scribbles, "replace": True})], cancel_slow,
        slow_progress))
    refine.start()
    assert slow_running.wait(WAIT_S), "the refine started on the server"
    click = threading.Thread(target=run, args=("Click", other, [("click", (voxel,), {"label": PANCREAS})],
                                               None, lambda fraction, message: messages.append(message)))
    click.start()
    try:
        for _ in range(int(WAIT_S / 0.05)):
            if "queued on the server: 1 job ahead" in messages:
                break
            assert click.is_alive(), f"the click finished while the refine ran: {outcomes}"
            threading.Event().wait(0.05)
        assert "queued on the server: 1 job ahead" in messages, messages
    finally:
        cancel_slow.set()
        refine.join(WAIT_S)
        click.join(WAIT_S)

    assert isinstance(outcomes["Refine"], JobCancelled)
    assert isinstance(outcomes["Click"], np.ndarray), outcomes["Click"]
    assert outcomes["Click"][voxel[2], voxel[1], voxel[0]] == PANCREAS
    # nothing to redo: redo answers the session's mask as it is, still the click's
    np.testing.assert_array_equal(slow.call([("redo", (), {})]), before)
    facts = slow.call([("describe", (), {})])
    assert facts["scribbled_voxels"] < int((scribbles != 255).sum()), "the cancelled refine took no scribbles"
