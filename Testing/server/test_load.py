"""A bounded load test: 8 clients x 50 calls at once on one server, no call lost and no session mixed up.

Each client has its own session on its own image (its own shape) and paints with its own label only, so any
answer that reached the wrong client shows: a mask of another shape, another client's label in a mask, or a
count of clicks or locks that is not this client's. Timings are not checked here (``benchmarks/
server_latency.py`` measures them).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from remote_helpers import TOKEN, network, running_server

from AttentionSegLib import Volume

pytestmark = pytest.mark.slow
CLIENTS, ROUNDS = 8, 10  # 5 calls a round: 50 calls a client
WAIT_S = 600.0


def client_image(index: int) -> Volume:
    """A bright cube on a dark background; the shape tells the clients apart."""
    array = np.full((12, 20 + 2 * index, 20), -500, np.int16)
    array[3:9, 5:15, 5:15] = 300
    return Volume(array, spacing=(1.0, 1.0, 2.0), origin=(float(index), 0.0, 0.0))


def one_client(url: str, index: int, outcome: dict[str, Any]) -> None:
    """Open a session and make 50 calls, checking each answer against what this client alone did."""
    from AttentionSegLib import ServerClient

    label = index + 1
    session = ServerClient(url, TOKEN).open_session(
        client_image(index), dict(network({k: f"organ {k}" for k in range(1, 9)}), out_channels=CLIENTS + 1),
        options={"settings": {"click_budget_s": 0.0, "max_roi": [12, 24, 24]}, "seed": index})
    shape = session.shape
    calls = clicks = 0
    problems: list[str] = []
    try:
        for round_ in range(ROUNDS):
            point = (5 + round_ % 10, 5 + (round_ * 3) % 10, 3 + round_ % 6)
            mask = session.call([("click", (point,), {"label": label})], name="Click")
            clicks += 1
            if mask.shape != shape:
                problems.append(f"a mask of shape {mask.shape} instead of {shape}")
            foreign = set(np.unique(mask).tolist()) - {0, label}
            if foreign:
                problems.append(f"labels {sorted(foreign)} of other clients in the mask")
            for step, expected_lock in (("describe", []), ("lock", None), ("describe", [label]),
                                        ("unlock", None)):
                if step in ("lock", "unlock"):
                    session.call([(step, ([label],), {})], name=step)
                else:
                    facts = session.call([("describe", (), {})], name="describe")
                    if facts["clicks"] != clicks or facts["locked"] != expected_lock:
                        problems.append(f"describe says {facts['clicks']} clicks, locked {facts['locked']}; "
                                        f"this client made {clicks}, locked {expected_lock}")
            calls += 5
    except Exception as error:  # a lost call: counted, the thread ends
        problems.append(f"call {calls + 1} failed: {type(error).__name__}: {error}")
    finally:
        session.close(quiet=True)
    outcome.update(calls=calls, problems=problems)


def test_eight_clients_fifty_calls_each_no_call_lost_no_session_mixed_up(tmp_path: Path) -> None:
    with running_server(tmp_path, "--max-sessions", str(CLIENTS), token=TOKEN) as running:
        outcomes: list[dict[str, Any]] = [{} for _ in range(CLIENTS)]
        threads = [threading.Thread(target=one_client, args=(running.url, n, outcomes[n]))
                   for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)

        assert not any(thread.is_alive() for thread in threads), "a client hung"
        for index, outcome in enumerate(outcomes):
            assert outcome.get("problems") == [], f"client {index}: {outcome}"
            assert outcome["calls"] == ROUNDS * 5
        health = running.client().health()
        assert health["sessions"] == 0 and health["queue"] == 0, health
