"""A client of ``attentionseg serve`` on the standard library (``urllib``, ``json``, ``zlib``) and numpy.

Slicer's Python has neither httpx nor requests for sure, and the client must not need torch, so this is what
the Slicer module's remote backend uses::

    client = ServerClient("http://gpu-box:8765", token="...")
    client.health()                                     # raises ServerUnreachable / ServerError (401 ...)
    session = client.open_session(volume, "demo_abdomen_ct")
    mask = session.call([("click", ((60, 48, 20),), {"label": 7})], name="Click")
    mask = session.call([("refine", (), {"time_budget_s": 10, "scribbles": scribbles, "replace": True})])
    session.close()

Calls block until the server's job finishes, reporting ``progress(fraction, message)`` (with the job's place
in the server's queue while it waits) and asking the server to cancel when ``cancel.is_set()``; a click's or a
box's structure can be shown as it grows (``preview=``). Scribble maps go up, and masks come back, as
changed-region patches (:mod:`.patches`).
"""

from __future__ import annotations

import builtins
import dataclasses
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import API_PREFIX, PACKET_TYPE
from .codec import decode, encode
from .patches import Mirror, StalePatch, preview_mask

Progress = Callable[[float, str], None]
FINISHED = ("succeeded", "failed", "cancelled")
#: engine errors that come back as the same built-in exception type (others as RuntimeError)
BUILTIN_ERRORS = ("ValueError", "TypeError", "KeyError", "IndexError", "RuntimeError", "MemoryError",
                  "NotImplementedError", "AttributeError", "FileNotFoundError")


class ServerError(RuntimeError):
    """The server answered with an error status; ``status`` is the HTTP status, the message its reason."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ServerUnreachable(ConnectionError):
    """The server could not be reached, or the connection broke during a call."""


class JobCancelled(RuntimeError):
    """The server cancelled the job (on request, or because its session was closed)."""


class ServerClient:
    """Talks to one server.

    Args:
        url: ``http://host:port`` or ``https://host/prefix`` (a TLS reverse proxy in front of the server).
        token: the server's bearer token (``None`` for a loopback server without one).
        timeout: seconds to wait for an answer to one request (long polls add their own wait).
        poll_s: how long one status request waits on the server for the job to finish.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0, poll_s: float = 0.25):
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"server URL {url!r} must look like http://host:8765 or https://host/path")
        self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self.token = token.strip() if token else None
        self.timeout = float(timeout)
        self.poll_s = float(poll_s)
        loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
        handlers = [urllib.request.ProxyHandler({})] if loopback else []  # no proxy between us and ourselves
        self._opener = urllib.request.build_opener(*handlers)

    # -- server ----------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The server's state (device, sessions, limits); also checks the token."""
        return self._json("GET", "/health")

    def models(self) -> list[str]:
        """The names of the models the server can open."""
        return [entry["name"] for entry in self._json("GET", "/models")["models"]]

    def open_session(self, volume: Any, model: str | dict[str, Any], *, options: dict[str, Any] | None = None,
                     progress: Progress | None = None, cancel: Any = None) -> RemoteSession:
        """Upload ``volume`` (an engine ``Volume``: array and geometry) and open a session on ``model``.

        Args:
            model: the name of one of the server's models, or a network config (an untrained network).
            options: ``settings`` (a ``RefineSettings`` or a dict), ``max_history``, ``seed``, and for
                LiteMedSAM ``model_options`` (a ``MedSAMSettings`` or a dict of some of its fields).

        Raises:
            ServerError: refused (token, limits, unknown model ...); ServerUnreachable: no connection.
        """
        health = self.health()
        limit = health.get("max_upload_bytes")
        options = dict(options or {})
        for key in ("settings", "model_options"):
            if dataclasses.is_dataclass(options.get(key)):
                options[key] = dataclasses.asdict(options[key])
        array = np.asarray(volume.array)
        image = {"array": array, "spacing": list(volume.spacing), "origin": list(volume.origin),
                 "direction": list(volume.direction)}
        body = encode({"image": image, "model": model, "options": options})
        if limit is not None and len(body) > int(limit):
            raise ServerError(413, f"the compressed image ({len(body)} bytes) exceeds the server's upload "
                                   f"limit of {limit} bytes (attentionseg serve --max-upload-mb)")
        status = self._packet("POST", "/sessions", body=body, wait=self.poll_s,
                              timeout=max(self.timeout, 300))
        session = RemoteSession(self, status["session_id"], tuple(array.shape))
        session.features = frozenset(health.get("features") or ())
        try:
            session.description = self.follow(status, "Start session", progress, cancel)["result"]
        except BaseException:
            session.close(quiet=True)
            raise
        return session

    # -- jobs ------------------------------------------------------------------------------------------------
    def follow(self, status: dict[str, Any], name: str, progress: Progress | None,
               cancel: Any, preview: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll a job until it finishes; its final status (with the result) or the job's error raised.

        ``preview``: called with each newer preview packet the job's status carries
        (:func:`.patches.preview_packet`; the job must have been submitted with ``preview_every_s``)."""
        cancel_sent = False
        seen = 0
        while status["state"] not in FINISHED:
            if cancel is not None and cancel.is_set() and not cancel_sent:
                self._json("POST", f"/jobs/{status['job_id']}/cancel")
                cancel_sent = True
            if progress is not None:
                progress(*_progress_of(status))
            status = self._packet("GET", f"/jobs/{status['job_id']}", wait=self.poll_s,
                                  preview_after=None if preview is None else seen,
                                  what=f"while {name} ran on the server")
            shown = status.get("preview")
            if preview is not None and isinstance(shown, dict) and isinstance(shown.get("version"), int):
                seen = max(seen, shown["version"])
                preview(shown)
        if progress is not None and status["state"] == "succeeded":
            progress(1.0, status.get("message") or "done on the server")
        if status["state"] == "cancelled":
            raise JobCancelled(f"{name} was cancelled on the server")
        if status["state"] == "failed":
            raise remote_error(status.get("error_type", ""), status.get("error", "the job failed"))
        return status

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _json(self, method: str, path: str) -> dict[str, Any]:
        return json.loads(self._request(method, path))

    def _packet(self, method: str, path: str, *, body: bytes | None = None, wait: float | None = None,
                timeout: float | None = None, preview_after: int | None = None,
                what: str = "") -> dict[str, Any]:
        query = {"wait": f"{wait:g}"} if wait is not None else {}
        if preview_after is not None:
            query["preview_after"] = str(int(preview_after))
        return decode(self._request(method, path, body=body, query=query or None, timeout=timeout,
                                    what=what))

    def _request(self, method: str, path: str, *, body: bytes | None = None,
                 query: dict[str, str] | None = None, timeout: float | None = None, what: str = "") -> bytes:
        url = f"{self.url}{API_PREFIX}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": f"{PACKET_TYPE}, application/json", "User-Agent": "AttentionSeg-client"}
        if body is not None:
            headers["Content-Type"] = PACKET_TYPE
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        wait = float(query["wait"]) if query and "wait" in query else 0.0
        try:
            with self._opener.open(request, timeout=(timeout or self.timeout) + wait) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise _server_error(error) from None
        except urllib.error.URLError as error:
            during = f" {what}" if what else ""
            raise ServerUnreachable(f"could not reach the AttentionSeg server at {self.url}{during}: "
                                    f"{error.reason}") from None
        except (http.client.HTTPException, OSError) as error:
            during = f" {what}" if what else ""
            raise ServerUnreachable(f"lost the connection to the AttentionSeg server at {self.url}{during} "
                                    f"({type(error).__name__}: {error}); the server may have stopped"
                                    ) from None


class RemoteSession:
    """One interactive session on the server; keeps the client's side of the scribble and mask patches.

    Attributes:
        id: the server's session id.
        shape: the image grid (array order).
        description: ``{"num_classes", "labels": {label: name}, "facts"}`` from the server at start.
        features: what the server does beyond the first API (``health()["features"]``, e.g. ``previews``).
    """

    def __init__(self, client: ServerClient, session_id: str, shape: tuple[int, ...]) -> None:
        self.client = client
        self.id = session_id
        self.shape = shape
        self.description: dict[str, Any] = {}
        self.features: frozenset[str] = frozenset()
        self.scribbles = Mirror(shape, 255)
        self.mask = Mirror(shape, 0)

    def call(self, calls: Sequence[tuple[str, Sequence[Any], dict[str, Any]]], *, name: str = "Job",
             progress: Progress | None = None, cancel: Any = None,
             preview: Callable[[int, np.ndarray], None] | None = None, preview_every_s: float = 1.0) -> Any:
        """Run ``(method, args, kwargs)`` calls in order as one server job; the last call's result.

        Scribble maps (arrays on the image grid) travel as patches; a mask result comes back as one and is
        returned whole; ``save_model`` returns the checkpoint's bytes. ``preview(label, mask)``: a click's or
        a box's structure as it grows (a boolean map on the image grid), at most every ``preview_every_s``
        seconds and only as often as the job's status is polled; a preview that does not fit the grid is
        passed over (it is only something to look at), and a server without the ``previews`` feature (an
        older one) answers as before, showing nothing.
        """
        every_s = None if preview is None or "previews" not in self.features else preview_every_s
        try:
            status = self._submit(calls, name, full=False, preview_every_s=every_s)
        except ServerError as error:
            if error.code != "stale_patch":
                raise
            # the server's copy fell behind: send it whole
            status = self._submit(calls, name, full=True, preview_every_s=every_s)

        def show(packet: dict[str, Any]) -> None:
            try:
                _, label, mask = preview_mask(self.shape, packet)
            except ValueError:
                return
            preview(label, mask)

        status = self.client.follow(status, name, progress, cancel, None if every_s is None else show)
        kind, result = status.get("result_kind"), status.get("result")
        if kind == "mask":
            try:
                return self.mask.apply(result)
            except StalePatch:  # a lost answer left our copy behind: fetch the mask whole
                return self.mask.apply(self.client._packet("GET", f"/sessions/{self.id}/mask")["mask"])
        return result

    def close(self, quiet: bool = False) -> None:
        """Close the session on the server (``quiet``: ignore a server that is gone)."""
        try:
            self.client._request("DELETE", f"/sessions/{self.id}", timeout=5.0)
        except (ServerError, ServerUnreachable):
            if not quiet:
                raise

    def _submit(self, calls: Sequence[tuple[str, Sequence[Any], dict[str, Any]]], name: str,
                full: bool, preview_every_s: float | None = None) -> dict[str, Any]:
        encoded = [{"method": method, "args": [self._argument(a, full) for a in args],
                    "kwargs": {k: self._argument(v, full) for k, v in kwargs.items()}}
                   for method, args, kwargs in calls]
        job: dict[str, Any] = {"name": name, "calls": encoded}
        if preview_every_s is not None:
            job["preview_every_s"] = float(preview_every_s)
        body = encode(job)
        return self.client._packet("POST", f"/sessions/{self.id}/jobs", body=body, wait=self.client.poll_s)

    def _argument(self, value: Any, full: bool) -> Any:
        if isinstance(value, np.ndarray):
            if value.shape != self.shape:
                raise ValueError(f"an array argument of shape {value.shape} is not a map on the image grid "
                                 f"{self.shape}")
            return self.scribbles.diff(value, full=full)
        return value


def remote_error(error_type: str, message: str) -> Exception:
    """The exception a failed server job stands for: the same built-in type, else a RuntimeError."""
    prefix = f"{error_type}: "
    if error_type in BUILTIN_ERRORS and message.startswith(prefix):
        return getattr(builtins, error_type)(message[len(prefix):])
    return RuntimeError(message)


def _server_error(error: urllib.error.HTTPError) -> ServerError:
    try:
        body = json.loads(error.read() or b"{}")
    except (ValueError, OSError):
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's own validation errors
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    message = detail or error.reason or "no reason given"
    return ServerError(error.code, f"the server answered {error.code}: {message}",
                       body.get("code", "") if isinstance(body, dict) else "")


def _progress_of(status: dict[str, Any]) -> tuple[float, str]:
    position = status.get("position")
    if position:
        ahead = "1 job" if position == 1 else f"{position} jobs"
        return 0.0, f"queued on the server: {ahead} ahead"
    if status.get("state") == "pending":
        return 0.0, "waiting for the server's device"
    return float(status.get("progress", 0.0)), status.get("message") or "running on the server"
