"""The backend seam over HTTP: the session lives on an ``attentionseg serve`` server (a GPU machine).

:class:`RemoteBackend` answers the same calls as :class:`~AttentionSegBackend.LocalBackend` (``open_session``,
``run``, ``cancel_all``, ``shutdown``), returns the same :class:`~AttentionSegBackend.Job` handles and runs
each job on one worker thread, so the Controller cannot tell where the engine runs. The worker forwards the
job's session calls to the server with the engine's stdlib-only client (``AttentionSegLib.ServerClient``):
the image is uploaded once, compressed with its geometry; scribbles go up and masks come back as
changed-region patches; progress (and the job's place in the server's queue) reaches ``Job.message``;
``Job.cancel`` cancels on the server. A click's or a box's structure is shown as it grows, as with the local
engine (``SessionCall.previews``): the server keeps its newest preview, about once a second
(``PREVIEW_EVERY_S``), and the next status poll brings it to ``Job.preview``.

A lost connection or a server that stopped fails the job with a message that says so; as for any failed job,
the Controller then changes no segment and no scribble. ``save_model`` asks the server for the checkpoint's
bytes and writes them here, at the path the user chose; the server never writes where a client says.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from AttentionSegBackend import PREVIEW_EVERY_S, Job, JobWorker, SessionCall


class RemoteBackend(JobWorker):
    """Runs the interactive session on a server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765`` or ``https://gpu.example.org/attentionseg``.
        token: its bearer token (``None`` for a loopback server without one).
        timeout: seconds to wait for one answer of the server.
        poll_s: how long one status request waits on the server (also how soon a cancel is passed on).
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0,
                 poll_s: float = 0.25) -> None:
        from AttentionSegLib import ServerClient

        super().__init__("AttentionSegRemote")
        self.client = ServerClient(url, token, timeout=timeout, poll_s=poll_s)
        self._session: Any = None  # AttentionSegLib.server.client.RemoteSession once started

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def has_session(self) -> bool:
        return self._session is not None

    @property
    def session_id(self) -> str | None:
        """The server's id of the open session."""
        return None if self._session is None else self._session.id

    def check_connection(self) -> dict[str, Any]:
        """The server's health (device, sessions, limits); raises with a readable message when it cannot be
        reached or refuses the token. Blocks for at most the client's timeout."""
        return self.client.health()

    def models(self) -> list[str]:
        """The models the server can open."""
        return self.client.models()

    # -- the seam --------------------------------------------------------------------------------------------
    def open_session(self, volume: Any, model: Any, **options: Any) -> Job:
        def create(job: Job) -> dict[str, Any]:
            if _is_local_file(model):
                raise ValueError(f"the model {str(model)!r} is a file on this computer; the server opens its "
                                 "own models by name (import the checkpoint there with `attentionseg models "
                                 "import NAME FILE`, then choose NAME)")
            options.pop("device", None)  # the server's device (attentionseg serve --device) does the work
            job.report(0.0, f"uploading the image to {self.url}")
            session = self.client.open_session(volume, model, options=options, progress=job.report,
                                               cancel=job.cancel_event)
            previous, self._session = self._session, session
            if previous is not None:
                previous.close(quiet=True)
            description = dict(session.description)
            description["labels"] = {int(k): str(v) for k, v in dict(description.get("labels", {})).items()}
            description["facts"] = {**dict(description.get("facts") or {}), "server": self.url}
            return description

        return self._submit("Start session", create)

    def run(self, name: str, calls: Sequence[SessionCall]) -> Job:
        calls = tuple(calls)
        if not calls:
            raise ValueError(f"{name}: no session calls given")

        def execute(job: Job) -> Any:
            session = self._session
            if session is None:
                raise RuntimeError("no interactive session is open; start a session first")
            save_to: Path | None = None
            remote = []
            for call in calls:
                if call.method == "save_model":  # the server sends the checkpoint; it is written here
                    save_to = Path(call.args[0] if call.args else call.kwargs["path"])
                    remote.append(("save_model", (), {}))
                else:
                    remote.append((call.method, tuple(call.args), dict(call.kwargs)))
            previews = any(call.previews for call in calls)
            result = session.call(remote, name=name, progress=job.report, cancel=job.cancel_event,
                                  preview=job.show_preview if previews else None,
                                  preview_every_s=PREVIEW_EVERY_S)
            if save_to is not None and isinstance(result, bytes):
                return _write_atomically(save_to, result)
            return result

        return self._submit(name, execute)

    def shutdown(self) -> None:
        """Cancel everything and close the session on the server (in the background: never blocks)."""
        self._stop_worker()
        session, self._session = self._session, None
        if session is not None:
            threading.Thread(target=session.close, kwargs={"quiet": True}, daemon=True).start()


def _is_local_file(model: Any) -> bool:
    if isinstance(model, os.PathLike):
        return True
    return isinstance(model, str) and (model.endswith((".pt", ".pth")) or os.sep in model or
                                       Path(model).is_file())


def _write_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` beside ``path`` first and move it into place (no half-written checkpoint)."""
    path = Path(path)
    handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return path
