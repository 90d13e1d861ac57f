"""Start the server: bind the socket, say in one line where it listens and on which device, run uvicorn."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable

from .. import resolve_device
from .config import ServerConfig


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port chosen by the system)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(config: ServerConfig, announce: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted or terminated (then the sessions are closed and their jobs cancelled)."""
    import uvicorn

    from .app import create_app
    from .service import Service

    device = resolve_device(config.device)
    sock = bind(config.host, config.port)
    try:
        service = Service(config, device)
        app = create_app(config, service)
        server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, server_header=False, timeout_graceful_shutdown=5,
            limit_concurrency=256))
        precision = ", mixed-precision inference" if device.type == "cuda" else ""
        access = "token required" if config.token else "no token (loopback only)"
        line = (f"AttentionSeg server listening on {url_of(sock)} (device {device}{precision}; {access}; at "
                f"most {config.max_sessions} sessions, closed after {config.idle_timeout_s:g} s idle)")
        (announce or _print)(line)
        server.run(sockets=[sock])
    finally:
        sock.close()


def _print(line: str) -> None:
    print(line, flush=True)
    sys.stdout.flush()
