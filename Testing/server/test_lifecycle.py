"""``attentionseg serve`` as a process: what it says, what it refuses to start with, how it stops, and idle
sessions expiring."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from remote_helpers import (
    REPO_ROOT,
    TOKEN,
    network,
    port_is_open,
    running_server,
    server_env,
    stop,
    write_token,
)

from AttentionSegLib import ServerError

pytestmark = pytest.mark.slow
WAIT_S = 120.0


def serve(*args: str) -> subprocess.CompletedProcess:
    """Run ``attentionseg serve ARGS`` expecting it to refuse to start (a timeout fails the test)."""
    return subprocess.run([sys.executable, "-m", "AttentionSegLib.cli", "serve", "--device", "cpu", *args],
                          cwd=REPO_ROOT, env=server_env(), capture_output=True, text=True, timeout=WAIT_S)


def test_a_non_loopback_host_without_a_token_is_refused_before_listening() -> None:
    done = serve("--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2
    assert "attentionseg serve: error: refusing to listen on '0.0.0.0' without a token" in done.stderr
    assert "--token-file" in done.stderr and done.stdout == ""


@pytest.mark.parametrize(("token", "message"), [("", "the token file is empty"),
                                                ("short", "at least 16 characters")])
def test_an_unusable_token_file_is_refused(tmp_path: Path, token: str, message: str) -> None:
    done = serve("--port", "0", "--token-file", str(write_token(tmp_path, token)))
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""


def test_a_port_in_use_is_an_error_naming_the_problem(tmp_path: Path) -> None:
    with running_server(tmp_path) as running:
        done = serve("--port", str(running.port))
    assert done.returncode == 2 and "Address already in use" in done.stderr


def test_it_says_where_it_listens_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with running_server(tmp_path, "--max-sessions", "2", "--idle-timeout", "60", token=TOKEN) as running:
        assert port_is_open(running.port)
        assert running.client().health()["max_sessions"] == 2
        status = stop(running.process)
        assert status == 143, running.log_text()
        assert "attentionseg serve: terminated" in running.log_text()
        assert not port_is_open(running.port)


def test_it_prints_exactly_one_line_naming_the_url_and_device(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "AttentionSegLib.cli", "serve", "--port", "0", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=server_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
    finally:
        stop(process)
        rest = process.stdout.read()
        process.stdout.close()
    assert line.startswith("AttentionSeg server listening on http://127.0.0.1:")
    assert "(device cpu;" in line and "no token (loopback only)" in line
    assert rest == "", "one line, no more"


# -- idle expiry ---------------------------------------------------------------------------------------------


def test_an_idle_session_expires_and_the_client_is_told_why(tmp_path: Path, phantom: Any) -> None:
    with running_server(tmp_path, "--idle-timeout", "2") as running:
        client = running.client()
        idle = client.open_session(phantom[0], network(phantom[2]))
        busy = client.open_session(phantom[0], network(phantom[2]))
        assert client.health()["sessions"] == 2

        # the busy one is used every 0.2 s, for longer than the idle timeout; health() touches no session
        deadline = time.monotonic() + WAIT_S
        while client.health()["sessions"] == 2:
            assert time.monotonic() < deadline, "the idle session never expired"
            busy.call([("describe", (), {})])
            time.sleep(0.2)

        assert client.health()["sessions"] == 1
        assert busy.call([("describe", (), {})])["clicks"] == 0, "the session in use is still there"
        with pytest.raises(ServerError, match="404: session .* expired after 2 s without a call") as gone:
            idle.call([("click", ((5, 5, 5),), {"label": 1})], name="Click")
        assert gone.value.status == 404
        np.testing.assert_array_equal(idle.mask.array, 0)  # the client's copy is untouched
