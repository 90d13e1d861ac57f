"""The server's sessions: how many, how much memory, how long they live, and their jobs.

A session is reserved before its image is handed to the engine (the count and the estimated memory are checked
first), opened by a job on the device queue, touched by every call, and closed by the client, by idle expiry
(no call for ``idle_timeout_s`` and no job pending or running) or when the server stops. Each session keeps
the two label-map mirrors of its client (:mod:`.patches`) and its recent jobs.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..label_maps import IGNORE_INDEX
from .config import ServerConfig
from .jobs import DeviceQueue, ServerJob
from .patches import Mirror

KEPT_JOBS, REMEMBERED_EXPIRED = 8, 1000


class StoreError(Exception):
    """Base of the store's refusals; ``status`` is the HTTP status the app answers with."""

    status = 400


class UnknownSession(StoreError):
    status = 404


class ServerFull(StoreError):
    status = 503


class TooLarge(StoreError):
    status = 413


def estimate_bytes(shape: tuple[int, ...], itemsize: int, max_history: int) -> int:
    """Rough memory of a session on an image of ``shape``: the image, a float copy and the class
    probabilities (8 bytes a voxel), mask, scribbles and their mirrors (4), the undo snapshots (2 per step)
    and the views in flight (16: attention maps, uncertainty). The network is added once it is loaded."""
    voxels = int(np.prod(shape, dtype=np.int64))
    return voxels * (itemsize + 8 + 4 + 2 * max_history + 16)


@dataclass
class ServerSession:
    """One client's interactive session and what the server keeps beside it."""

    id: str
    shape: tuple[int, ...]
    estimated_bytes: int
    engine: Any = None  # the InteractiveSession, once its opening job has run
    scribbles: Mirror = field(init=False)
    mask: Mirror = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: OrderedDict[str, ServerJob] = field(default_factory=OrderedDict)
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False

    def __post_init__(self) -> None:
        self.scribbles = Mirror(self.shape, IGNORE_INDEX)
        self.mask = Mirror(self.shape, 0)

    @property
    def busy(self) -> bool:
        return any(not job.finished for job in self.jobs.values())


class SessionStore:
    """All sessions of the server.

    Args:
        config: the limits.
        queue: the device queue every job goes to.
        on_close: called with each session removed (e.g. to free the GPU's cache).
    """

    def __init__(self, config: ServerConfig, queue: DeviceQueue,
                 on_close: Callable[[ServerSession], None] | None = None) -> None:
        self.config = config
        self.queue = queue
        self._on_close = on_close
        self._sessions: dict[str, ServerSession] = {}
        self._expired: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone
        self._shared: dict[str, int] = {}  # process-wide caches the sessions use: name -> bound (bytes)
        self._lock = threading.RLock()

    # -- sessions --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def estimated_bytes(self) -> int:
        """The estimated memory of the sessions and of the process-wide caches they have used."""
        with self._lock:
            return self._used()

    def _used(self) -> int:
        return sum(s.estimated_bytes for s in self._sessions.values()) + sum(self._shared.values())

    def reserve(self, shape: tuple[int, ...], itemsize: int, max_history: int) -> ServerSession:
        """A new, not yet opened session, if the count and the memory bound allow it.

        Raises:
            ServerFull: ``max_sessions`` are open, or the memory bound would be crossed.
            TooLarge: this image alone would cross the memory bound.
        """
        needed = estimate_bytes(shape, itemsize, max_history)
        limit = self.config.max_memory_bytes
        if needed > limit:
            raise TooLarge(f"an image of shape {tuple(shape)} needs about {_mib(needed)} on the server, more "
                           f"than its memory bound of {_mib(limit)} (attentionseg serve --max-memory-mb)")
        with self._lock:
            if len(self._sessions) >= self.config.max_sessions:
                raise ServerFull(f"the server has {len(self._sessions)} open sessions, its maximum "
                                 "(attentionseg serve --max-sessions); close one or try again later")
            used = self._used()
            if used + needed > limit:
                raise ServerFull(f"the open sessions and their caches hold about {_mib(used)}; this image "
                                 f"needs {_mib(needed)} more, beyond the server's memory bound of "
                                 f"{_mib(limit)}; try again later")
            session = ServerSession(uuid.uuid4().hex, tuple(int(n) for n in shape), needed)
            self._sessions[session.id] = session
            return session

    def add_bytes(self, session: ServerSession, extra: int, shared: dict[str, int] | None = None) -> None:
        """Count ``extra`` bytes more for ``session`` (its network and its own caches, once loaded), and the
        process-wide caches it uses (``shared``: name -> bound in bytes), each counted once for the
        process, at the largest bound any session gave it, for as long as the server runs (the process keeps
        them).

        Raises:
            TooLarge: the memory bound is crossed (the caller closes the session).
        """
        with self._lock:
            session.estimated_bytes += int(extra)
            for name, bound in (shared or {}).items():
                self._shared[name] = max(self._shared.get(name, 0), int(bound))
            used = self._used()
            if used > self.config.max_memory_bytes:
                raise TooLarge(f"with its network and caches this session needs about "
                               f"{_mib(session.estimated_bytes)}; "
                               f"the sessions would hold {_mib(used)}, beyond the server's memory bound of "
                               f"{_mib(self.config.max_memory_bytes)}")

    def get(self, session_id: str) -> ServerSession:
        """The session, marked as used now.

        Raises:
            UnknownSession: no such session (the message says when it expired or was closed).
        """
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                why = self._expired.get(session_id)
                raise UnknownSession(f"session {session_id} {why}" if why else
                                     f"unknown session {session_id!r}: the server does not know it (it may "
                                     "have been restarted); start a new session")
            session.last_used = time.monotonic()
            return session

    def close(self, session_id: str, why: str = "was closed") -> ServerSession:
        """Remove a session and cancel its jobs (a running one stops at the engine's next check)."""
        with self._lock:
            session = self.get(session_id)
            del self._sessions[session_id]
            self._expired[session_id] = f"{why}; start a new session"
            while len(self._expired) > REMEMBERED_EXPIRED:
                self._expired.popitem(last=False)
            session.closed = True
        for job in self.jobs_of(session):
            self.queue.cancel(job)
        if self._on_close is not None:
            self._on_close(session)
        return session

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Close the sessions idle for longer than ``idle_timeout_s`` (never one with work in flight)."""
        now = time.monotonic() if now is None else now
        timeout = self.config.idle_timeout_s
        with self._lock:
            idle = [s.id for s in self._sessions.values()
                    if now - s.last_used > timeout and not s.busy]
        for session_id in idle:
            try:
                self.close(session_id, f"expired after {timeout:g} s without a call")
            except UnknownSession:
                pass
        return idle

    def close_all(self) -> None:
        with self._lock:
            ids = list(self._sessions)
        for session_id in ids:
            self.close(session_id, "was closed when the server stopped")

    # -- jobs ------------------------------------------------------------------------------------------------
    def submit(self, session: ServerSession, job: ServerJob) -> None:
        """Queue ``job`` for ``session`` (its finished jobs beyond the most recent few are forgotten)."""
        with self._lock:
            if session.closed:
                raise UnknownSession(f"session {session.id} was closed")
            finished = [jid for jid, j in session.jobs.items() if j.finished]
            for jid in finished[: max(0, len(finished) - KEPT_JOBS + 1)]:
                del session.jobs[jid]
            session.jobs[job.id] = job
        self.queue.submit(job)

    def jobs_of(self, session: ServerSession) -> list[ServerJob]:
        """The session's kept jobs, oldest first (a copy: other threads add jobs meanwhile)."""
        with self._lock:
            return list(session.jobs.values())

    def job(self, job_id: str) -> tuple[ServerSession, ServerJob]:
        """The job and its session (marked as used).

        Raises:
            UnknownSession: no open session has this job.
        """
        with self._lock:
            for session in self._sessions.values():
                job = session.jobs.get(job_id)
                if job is not None:
                    session.last_used = time.monotonic()
                    return session, job
        raise UnknownSession(f"unknown job {job_id!r}: its session is closed or expired, or the job is long "
                             "finished")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"
