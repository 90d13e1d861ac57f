"""Helpers of the server tests: a real ``attentionseg serve`` process on 127.0.0.1, stopped (and checked
closed) after, and small images, networks and scribbles.

Every server here is the command line itself (``python -m AttentionSegLib.cli serve --port 0 ...``) in a
subprocess: the tests talk HTTP to it over the loopback interface, as Slicer would. The fixture reads the one
line the server prints to learn its address, and on teardown terminates it, kills it if it does not stop, and
checks that nothing listens on its port any more.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "AttentionSeg"
for _path in (REPO_ROOT, MODULE_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

START_TIMEOUT_S = 120.0
TOKEN = "test-token-0123456789abcdef"

#: a small untrained 3D attention U-Net with 8 classes (fast on 2 CPU cores)
SMALL_NETWORK: dict[str, Any] = {
    "name": "attention_unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 8,
    "filters": [4, 8, 16, 32],
    "preprocessing": {"normalization": {"kind": "ct_window", "window": [-160, 240]}, "spacing": None,
                      "patch_size": [16, 32, 32]},
}
#: clicks do not fine-tune, refinement is one or two steps on a small region
FAST_SETTINGS: dict[str, Any] = {"max_roi": [16, 48, 48], "click_budget_s": 0.0, "min_steps": 1,
                                 "max_steps": 2, "margin": 4, "crf_radius": 1, "head_seconds": 0.5}


@dataclass
class ServerProcess:
    """A running server: its URL, token, process and where its log goes."""

    url: str
    port: int
    token: str | None
    process: subprocess.Popen
    log: Path

    def client(self, token: str | None = "default", **options: Any) -> Any:
        from AttentionSegLib import ServerClient

        return ServerClient(self.url, self.token if token == "default" else token, **options)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def port_is_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    """A port nothing listens on (the system's choice, released at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def write_token(folder: Path, token: str = TOKEN) -> Path:
    path = folder / "token.txt"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def _first_line(process: subprocess.Popen, timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


@contextmanager
def running_server(folder: Path, *args: str, token: str | None = None) -> Iterator[ServerProcess]:
    """``attentionseg serve --port 0 --device cpu ARGS`` until the block ends; nothing listens afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "AttentionSegLib.cli", "serve", "--port", "0", "--device", "cpu", *args]
    if token is not None:
        command += ["--token-file", str(write_token(folder, token))]
    log = folder / "server.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=server_env(), stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
    port = None
    try:
        line = _first_line(process, START_TIMEOUT_S)
        found = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        assert found, f"the server did not say where it listens: {line!r}\n{log.read_text(errors='replace')}"
        port = int(found.group(2))
        yield ServerProcess(found.group(1), port, token, process, log)
    finally:
        stop(process)
        if process.stdout is not None:
            process.stdout.close()
        if port is not None:
            assert not port_is_open(port), f"something still listens on port {port} after the server stopped"


def stop(process: subprocess.Popen) -> int:
    """Terminate (SIGTERM), and kill if it has not ended within 20 s; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(20)


def network(names: dict[int, str] | None = None) -> dict[str, Any]:
    return dict(SMALL_NETWORK, labels=names) if names else dict(SMALL_NETWORK)


def organ_voxel(labels: np.ndarray, label: int) -> tuple[int, int, int]:
    """A voxel (i, j, k) of ``label`` near its centre of mass."""
    voxels = np.argwhere(labels == label)
    k, j, i = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
    return int(i), int(j), int(k)


def scribbles_for(labels: np.ndarray, label: int, k: int) -> np.ndarray:
    """Foreground strokes on the organ and background strokes on the other organs, on slice ``k``."""
    scribbles = np.full(labels.shape, 255, np.uint8)
    scribbles[k][labels[k] == label] = label
    scribbles[k][(labels[k] != label) & (labels[k] > 0)] = 0
    return scribbles
