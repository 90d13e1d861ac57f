"""What a client may ask the server, and what the server refuses to start with (no process needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from AttentionSegLib.server.calls import METHODS, CallError, parse_call, parse_calls
from AttentionSegLib.server.config import ServerConfig, ServerConfigError, is_loopback, read_token

SCRIBBLE_PATCH = {"kind": "full", "version": 1, "data": None}


def test_a_click_binds_its_arguments_like_the_session_method() -> None:
    call = parse_call({"method": "click", "args": [[10, 20, 3]], "kwargs": {"label": 7, "positive": False}})
    assert call.method == "click"
    assert call.arguments == {"point_ijk": (10, 20, 3), "label": 7, "positive": False}


def test_defaults_are_filled_in() -> None:
    assert parse_call({"method": "refine"}).arguments == {"time_budget_s": 10.0, "scribbles": None,
                                                          "replace": False}


@pytest.mark.parametrize(("raw", "message"), [
    ({"method": "__init__"}, "unknown method '__init__'"),
    ({"method": "family"}, "unknown method 'family'"),
    ({"method": "click"}, "missing a required argument: 'point_ijk'"),
    ({"method": "click", "args": [[1, 2, 3]], "kwargs": {"colour": 1}},
     "unexpected keyword argument 'colour'"),
    ({"method": "click", "args": [[1, 2]], "kwargs": {"label": "7"}}, "label must be an integer"),
    ({"method": "click", "args": [[1, 2, "x"]]}, "must be 2 or 3 finite numbers"),
    ({"method": "click", "args": [[1, 2, 3]], "kwargs": {"positive": 1}}, "must be true or false"),
    ({"method": "refine", "kwargs": {"time_budget_s": "10"}}, "finite number of seconds"),
    ({"method": "refine", "kwargs": {"scribbles": [[255]]}}, "must be a scribble patch"),
    ({"method": "lock", "args": [[1, -2]]}, "a label or a list of labels"),
    ({"method": "save_model", "args": ["/tmp/adapted.pt"]}, "save_model takes no path"),
    ({"method": "save_model", "kwargs": {"path": "x.pt"}}, "save_model takes no path"),
    ({"method": "undo", "extra": 1}, "must be an object with"),
    ("undo", "must be an object with"),
])
def test_bad_calls_are_refused_naming_the_argument(raw: object, message: str) -> None:
    with pytest.raises(CallError, match=message):
        parse_call(raw)


def test_a_job_holds_one_to_sixteen_calls() -> None:
    assert len(parse_calls([{"method": "undo"}] * 16)) == 16
    for calls in ([], [{"method": "undo"}] * 17, {"method": "undo"}):
        with pytest.raises(CallError, match="list of 1 to 16 calls"):
            parse_calls(calls)


def test_bounds_are_calls_with_two_points_and_a_label() -> None:
    call = parse_call({"method": "set_bounds", "args": [[1, 2, 3], [40, 50, 6]], "kwargs": {"label": 2}})
    assert call.arguments == {"corner_a_ijk": (1.0, 2.0, 3.0), "corner_b_ijk": (40.0, 50.0, 6.0), "label": 2}
    assert call.spec.reports_progress
    assert parse_call({"method": "clear_bounds", "kwargs": {"label": 2}}).arguments == {"label": 2}
    with pytest.raises(CallError):
        parse_call({"method": "set_bounds", "args": [[1, 2, 3]], "kwargs": {"label": 2}})


def test_prefetch_is_a_cancellable_call_with_one_point() -> None:
    call = parse_call({"method": "prefetch", "args": [[10, 20, 3]]})
    assert call.arguments == {"point_ijk": (10, 20, 3)} and call.spec.reports_progress
    with pytest.raises(CallError, match="point_ijk"):
        parse_call({"method": "prefetch", "args": [[10, 20, "3"]]})


def test_no_callable_method_takes_a_path() -> None:
    for name, spec in METHODS.items():
        assert not {"path", "filename", "file"} & set(spec.signature.parameters), name


# -- configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("gpu.example.org", False)])
def test_which_hosts_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_non_loopback_host_needs_a_token() -> None:
    with pytest.raises(ServerConfigError, match="refusing to listen on '0.0.0.0' without a token"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", token="x" * 32).token == "x" * 32


def test_short_tokens_and_bad_limits_are_refused() -> None:
    with pytest.raises(ServerConfigError, match="at least 16 characters"):
        ServerConfig(token="short")
    with pytest.raises(ServerConfigError, match="max-sessions"):
        ServerConfig(max_sessions=0)
    with pytest.raises(ServerConfigError, match="idle-timeout"):
        ServerConfig(idle_timeout_s=0)


def test_the_token_file_is_read_and_checked(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  secret-token-0123456789\n")
    token.chmod(0o600)
    assert read_token(token) == "secret-token-0123456789"

    with pytest.raises(ServerConfigError, match="cannot read the token file"):
        read_token(tmp_path / "missing")
    token.write_text("\n")
    with pytest.raises(ServerConfigError, match="is empty"):
        read_token(token)
    if os.name == "posix":
        token.write_text("secret-token-0123456789")
        token.chmod(0o644)
        with pytest.raises(ServerConfigError, match="readable by other users"):
            read_token(token)
