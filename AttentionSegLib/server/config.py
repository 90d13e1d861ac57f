"""What ``attentionseg serve`` is allowed to do: where it listens, who may call it, and its limits."""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import DEFAULT_PORT

MIN_TOKEN_LENGTH = 16


class ServerConfigError(ValueError):
    """A setting the server refuses to start with; the message says what to change."""


@dataclass(frozen=True)
class ServerConfig:
    """The server's settings (``attentionseg serve --help`` explains each).

    Attributes:
        host, port: where to listen (loopback by default; port 0 = any free port).
        token: the bearer token every call must carry; ``None`` only on a loopback host.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``mps`` (all sessions share it, one job at a time).
        max_sessions: open sessions at once.
        idle_timeout_s: a session without a call for this long is closed.
        max_upload_bytes: the largest request body.
        max_memory_bytes: the estimated memory of all sessions together.
        max_history: the undo depth a session may ask for.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    device: str = "auto"
    max_sessions: int = 4
    idle_timeout_s: float = 1800.0
    max_upload_bytes: int = 1 << 30
    max_memory_bytes: int = 16 << 30
    max_history: int = 20

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServerConfigError(f"--port {self.port} is not a TCP port (0..65535)")
        if self.max_sessions < 1:
            raise ServerConfigError(f"--max-sessions must be at least 1, got {self.max_sessions}")
        if not self.idle_timeout_s > 0:
            raise ServerConfigError(f"--idle-timeout must be positive, got {self.idle_timeout_s}")
        if self.max_upload_bytes < 1024 or self.max_memory_bytes < 1024:
            raise ServerConfigError("the upload and memory limits must be at least 1 KiB")
        if self.token is None and not is_loopback(self.host):
            raise ServerConfigError(
                f"refusing to listen on {self.host!r} without a token: anyone who reaches it could run work "
                "on this machine; pass --token-file FILE (a file holding a long random token, e.g. from "
                "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`), or listen on 127.0.0.1 "
                "and put a TLS reverse proxy in front")
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ServerConfigError(f"the token must have at least {MIN_TOKEN_LENGTH} characters")


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` and ``localhost``; anything else (``0.0.0.0`` too) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (its first line, stripped).

    Raises:
        ServerConfigError: the file is missing, empty, or readable by other users (POSIX).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as error:
        raise ServerConfigError(f"{path}: cannot read the token file ({error.strerror or error})") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ServerConfigError(f"{path}: the token file is readable by other users; chmod 600 it")
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ServerConfigError(f"{path}: the token file is empty")
    return token
