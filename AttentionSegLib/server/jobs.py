"""One job at a time on the device: a FIFO queue, its worker thread, and the jobs' life cycle.

Every call that touches a network (opening a session, clicks, refinements, views, undo) is a
:class:`ServerJob` on the :class:`DeviceQueue`, so sessions never run on the device at the same time and a
client can see where its job stands: ``position`` 0 while it runs, ``n`` while ``n`` jobs are ahead of it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .patches import preview_packet

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "pending", "running", "succeeded", "failed", "cancelled"
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})


class ServerJob:
    """A piece of work for one session; thread-safe.

    Attributes:
        id: unguessable id (the client polls ``/v1/jobs/{id}``).
        session_id, name: whose job and what it does.
    """

    def __init__(self, session_id: str, name: str, work: Callable[[ServerJob], Any]) -> None:
        self.id = uuid.uuid4().hex
        self.session_id = session_id
        self.name = name
        self.work = work
        self.cancel_event = threading.Event()
        self.done_event = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a preview came or the job finished
        self._preview: dict[str, Any] | None = None
        self.state = PENDING
        self.progress = 0.0
        self.message = ""
        self.result: Any = None
        self.error = ""  # "ValueError: ..." when failed
        self.error_type = ""
        self.finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def report(self, done: float, total: float | str | None = None, message: str = "") -> None:
        """Progress in either engine convention: ``(fraction, message)`` or ``(done, total)``."""
        if isinstance(total, str):
            total, message = None, total
        fraction = float(done) if total is None else (float(done) / float(total) if float(total) else 0.0)
        with self._lock:
            self.progress = min(max(fraction, 0.0), 1.0)
            if message:
                self.message = str(message)

    def show_preview(self, label: int, mask: np.ndarray) -> None:
        """The engine's preview callback (``AttentionSegLib.Preview``), on the device thread: keeps the
        structure so far (the box of its voxels, :func:`.patches.preview_packet`) for the next status that
        asks for it, and wakes a client waiting for it."""
        with self._changed:
            version = 1 if self._preview is None else self._preview["version"] + 1
            self._preview = preview_packet(version, label, mask)
            self._changed.notify_all()

    def wait(self, timeout: float, preview_after: int | None = None) -> None:
        """Wait up to ``timeout`` s for the job to finish or, with ``preview_after``, for a newer preview."""
        with self._changed:
            self._changed.wait_for(lambda: self.state in FINISHED or (
                preview_after is not None and self._preview is not None
                and self._preview["version"] > preview_after), max(0.0, timeout))

    def cancel(self) -> None:
        self.cancel_event.set()

    def finish(self, state: str, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            self.state = state
            self.result = result
            if error is not None:
                self.error_type = type(error).__name__
                self.error = f"{self.error_type}: {error}"
            if state == SUCCEEDED:
                self.progress = 1.0
            self.finished_at = time.monotonic()
            self._preview = None  # a finished job answers with its result
            self._changed.notify_all()
        self.done_event.set()

    def status(self, position: int | None, preview_after: int | None = None) -> dict[str, Any]:
        """What the client sees while it waits (no result); with ``preview_after``, a running job's preview
        when it is newer than that version."""
        with self._lock:
            status = {"job_id": self.id, "session_id": self.session_id, "name": self.name,
                      "state": self.state, "progress": self.progress, "message": self.message}
            if position is not None:
                status["position"] = position
            if (preview_after is not None and self.state == RUNNING and self._preview is not None
                    and self._preview["version"] > preview_after):
                status["preview"] = self._preview
            if self.state == FAILED:
                status.update(error=self.error, error_type=self.error_type)
            return status


class DeviceQueue:
    """Runs jobs one after another, in submission order, on one worker thread.

    Args:
        device: the device's name (shown to clients).
        is_cancellation: tells an engine exception that means "stopped on request" from a failure.
    """

    def __init__(self, device: str, is_cancellation: Callable[[BaseException], bool]) -> None:
        self.device = device
        self._is_cancellation = is_cancellation
        self._pending: deque[ServerJob] = deque()
        self._running: ServerJob | None = None
        self._condition = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"attentionseg-{device}", daemon=True)
        self._thread.start()

    def submit(self, job: ServerJob) -> None:
        with self._condition:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            self._pending.append(job)
            self._condition.notify()

    def position(self, job: ServerJob) -> int | None:
        """0 while ``job`` runs, ``n`` while ``n`` jobs are ahead of it, None once it has finished."""
        with self._condition:
            if job is self._running:
                return 0
            for index, pending in enumerate(self._pending):
                if pending is job:
                    return index + (1 if self._running is not None else 0)
            return None

    def __len__(self) -> int:
        with self._condition:
            return len(self._pending) + (1 if self._running is not None else 0)

    def cancel(self, job: ServerJob) -> None:
        """A pending job is finished as cancelled at once; a running one stops at the engine's next check."""
        job.cancel()
        with self._condition:
            if job in self._pending:
                self._pending.remove(job)
                job.finish(CANCELLED)

    def stop(self) -> None:
        """Cancel everything and let the worker end."""
        with self._condition:
            self._stopped = True
            pending, self._pending = list(self._pending), deque()
            running = self._running
            self._condition.notify_all()
        for job in pending:
            job.cancel()
            job.finish(CANCELLED)
        if running is not None:
            running.cancel()

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._stopped:
                    self._condition.wait()
                if self._stopped:
                    return
                job = self._running = self._pending.popleft()
                job.state = RUNNING
            try:
                self._run(job)
            finally:
                with self._condition:
                    self._running = None

    def _run(self, job: ServerJob) -> None:
        if job.cancel_event.is_set():
            job.finish(CANCELLED)
            return
        try:
            result = job.work(job)
        except BaseException as error:  # every failure reaches the client; the worker lives on
            if job.cancel_event.is_set() or self._is_cancellation(error):
                job.finish(CANCELLED)
            else:
                job.finish(FAILED, error=error)
            if not isinstance(error, Exception):
                raise
            return
        job.finish(SUCCEEDED, result=result)
