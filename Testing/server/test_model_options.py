"""LiteMedSAM's settings over HTTP: ``options.model_options`` of a new session, in a real
``attentionseg serve`` process on 127.0.0.1 (its default memory bound: LiteMedSAM's network does not fit
the small bound of ``test_http.py``). The refusals of bad options (422) are in ``test_http.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from remote_helpers import TOKEN, ServerProcess, running_server

from AttentionSegLib.interactive.medsam import MedSAMSettings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("server"), token=TOKEN) as running:
        yield running


def test_litemedsam_takes_its_settings_as_model_options(server: ServerProcess, phantom: Any,
                                                        medsam_weights: Path) -> None:
    """A ``MedSAMSettings`` or a dict of some of its fields reach the session's LiteMedSAM: its description
    says what is in effect (the field of view a slice is padded to, the prefetch's reach); unset fields keep
    their defaults, and a session without options has them all."""
    image, _, _ = phantom
    opened = []
    try:
        for options in ({"min_field_of_view_mm": 200.0, "prefetch_mm": 12.5},
                        MedSAMSettings(min_field_of_view_mm=200.0, prefetch_mm=12.5)):
            session = server.client().open_session(image, "medsam_lite", options={"model_options": options})
            opened.append(session)
            facts = opened[-1].description["facts"]
            assert facts["options"]["min_field_of_view_mm"] == 200.0 and facts["field_of_view_mm"] == 200.0
            assert facts["prefetch_mm"] == 12.5
            assert facts["options"]["cache_mib"] == MedSAMSettings().cache_mib
        opened.append(server.client().open_session(image, "medsam_lite"))
        facts = opened[-1].description["facts"]
        assert facts["options"] == MedSAMSettings().to_dict()
        assert facts["field_of_view_mm"] != 200.0 and facts["prefetch_mm"] == MedSAMSettings().prefetch_mm
    finally:
        for session in opened:
            session.close(quiet=True)


def test_the_memory_bound_counts_litemedsams_caches(server: ServerProcess, phantom: Any,
                                                    medsam_weights: Path) -> None:
    """A LiteMedSAM session's estimate holds its decoder-token cache (``token_cache_mib``) beside its
    network, and the server counts the image embeddings every session of the process shares once: a
    second session adds its own bytes only."""
    image, _, _ = phantom
    client = server.client()
    opened = []

    def open_with(token_mib: int) -> int:
        opened.append(client.open_session(image, "medsam_lite",
                                          options={"model_options": {"token_cache_mib": token_mib}}))
        return int(client._json("GET", f"/sessions/{opened[-1].id}")["estimated_bytes"])

    try:
        first = open_with(64)
        assert first > 64 << 20, "the token cache is counted in the session's estimate"
        with_one = client.health()["estimated_bytes"]
        assert with_one >= first + (MedSAMSettings().cache_mib << 20), "the shared embedding cache is counted"
        second = open_with(8)
        assert first - second == (64 - 8) << 20, "each session counts its own token cache"
        assert client.health()["estimated_bytes"] == with_one + second, "the shared cache is counted once"
    finally:
        for session in opened:
            session.close(quiet=True)
