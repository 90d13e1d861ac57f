"""The backend seam: where the engine's interactive session lives and runs, off Slicer's GUI thread.

The module's Logic never calls the engine directly. It opens a session on a backend and sends it
:class:`SessionCall` steps (``click``, ``add_scribbles`` + ``refine``, ``undo`` ...); each submission returns
a :class:`Job` at once, which the GUI polls (a Qt timer) for progress and the result, and can cancel. Only
plain data crosses the seam (numpy arrays, numbers, strings, the engine :class:`~AttentionSegLib.Volume`), so
a backend that forwards the same steps to a GPU server over HTTP can replace :class:`LocalBackend` without the
Logic noticing.

:class:`LocalBackend` keeps the session in this process and runs every job on one worker thread, so jobs run
one after another in submission order and never touch the session at the same time. MRML is never touched
here: results travel back to the GUI thread, which writes them into nodes.
"""

from __future__ import annotations

import enum
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

PREVIEW_EVERY_S = 1.0
"""How often an answer that grows is shown (:attr:`Job.preview`, by the local engine or by a server): about
once a second, each a copy of the mask on the worker thread and a segment written on the GUI thread."""


class JobState(enum.Enum):
    """Life cycle of a job: PENDING -> RUNNING -> one of the three final states."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class SessionCall:
    """One method call on the engine's interactive session.

    Args:
        method: the session method, e.g. ``"click"``.
        args, kwargs: its arguments (plain data only).
        reports_progress: the method takes ``progress=`` and ``cancel=`` keywords (long work such as
            ``refine``); the backend supplies them.
        previews: the method takes ``preview=`` (a click or a box, which LiteMedSAM propagates over seconds);
            a backend that can show the answer as it grows supplies it (:attr:`Job.preview`).
    """

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    reports_progress: bool = False
    previews: bool = False

    # One constructor per method of ``AttentionSegLib.InteractiveSession``, with its signature: callers never
    # spell a method name, and a backend that forwards calls elsewhere sends ``method`` as the call's name.
    @classmethod
    def click(cls, point_ijk: Sequence[float], *, label: int, positive: bool = True) -> SessionCall:
        # a click may fine-tune briefly when the network misses the structure, so it reports progress too
        return cls("click", (tuple(point_ijk),), {"label": int(label), "positive": bool(positive)},
                   reports_progress=True, previews=True)

    @classmethod
    def box(cls, corner_a_ijk: Sequence[float], corner_b_ijk: Sequence[float], *, label: int) -> SessionCall:
        return cls("box", (tuple(corner_a_ijk), tuple(corner_b_ijk)), {"label": int(label)},
                   reports_progress=True, previews=True)

    @classmethod
    def set_bounds(cls, corner_a_ijk: Sequence[float], corner_b_ijk: Sequence[float], *,
                   label: int) -> SessionCall:
        return cls("set_bounds", (tuple(corner_a_ijk), tuple(corner_b_ijk)), {"label": int(label)},
                   reports_progress=True)

    @classmethod
    def clear_bounds(cls, *, label: int) -> SessionCall:
        return cls("clear_bounds", (), {"label": int(label)})

    @classmethod
    def prefetch(cls, point_ijk: Sequence[float]) -> SessionCall:
        # LiteMedSAM encodes the slices around the point; cancelled, it stops quietly at the next slice
        return cls("prefetch", (tuple(point_ijk),), reports_progress=True)

    @classmethod
    def add_scribbles(cls, scribble_map: np.ndarray, *, replace: bool = False) -> SessionCall:
        return cls("add_scribbles", (scribble_map,), {"replace": bool(replace)})

    @classmethod
    def refine(cls, time_budget_s: float, *, scribbles: np.ndarray | None = None,
               replace: bool = False) -> SessionCall:
        return cls("refine", (), {"time_budget_s": float(time_budget_s), "scribbles": scribbles,
                                  "replace": bool(replace)}, reports_progress=True)

    @classmethod
    def segment(cls) -> SessionCall:
        return cls("segment", reports_progress=True)

    @classmethod
    def undo(cls) -> SessionCall:
        return cls("undo")

    @classmethod
    def redo(cls) -> SessionCall:
        return cls("redo")

    @classmethod
    def lock(cls, labels: Sequence[int]) -> SessionCall:
        return cls("lock", ([int(label) for label in labels],))

    @classmethod
    def unlock(cls, labels: Sequence[int]) -> SessionCall:
        return cls("unlock", ([int(label) for label in labels],))

    @classmethod
    def attention_maps(cls) -> SessionCall:
        return cls("attention_maps")

    @classmethod
    def uncertainty(cls) -> SessionCall:
        return cls("uncertainty")

    @classmethod
    def describe(cls) -> SessionCall:
        return cls("describe")

    @classmethod
    def save_model(cls, path: str) -> SessionCall:
        return cls("save_model", (str(path),))


class Job:
    """Handle on a submitted piece of work; thread-safe, polled from the GUI thread.

    Attributes:
        name: what the job does, shown to the user ("Refine", "Click" ...).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._state = JobState.PENDING
        self._progress = 0.0
        self._message = ""
        self._result: Any = None
        self._error: BaseException | None = None
        self._traceback = ""
        self._preview: tuple[int, int, np.ndarray] | None = None
        self.submitted_at = time.monotonic()

    # -- read from any thread --------------------------------------------------------------------------------
    @property
    def state(self) -> JobState:
        with self._lock:
            return self._state

    @property
    def progress(self) -> float:
        """Fraction done in [0, 1] as last reported by the engine."""
        with self._lock:
            return self._progress

    @property
    def message(self) -> str:
        with self._lock:
            return self._message

    @property
    def preview(self) -> tuple[int, int, np.ndarray] | None:
        """The engine's last look at the answer it is computing, ``(version, label, mask)``: ``label``'s
        structure so far as a boolean mask on the volume's grid (LiteMedSAM's propagation of a click or a box,
        :meth:`show_preview`); ``version`` counts the previews, so that a poller writes each once. ``None``
        before the first."""
        with self._lock:
            return self._preview

    @property
    def error(self) -> BaseException | None:
        with self._lock:
            return self._error

    @property
    def error_message(self) -> str:
        """``"<name> failed: <exception type>: <message>"``, or an empty string when the job did not fail."""
        error = self.error
        if error is None:
            return ""
        return f"{self.name} failed: {type(error).__name__}: {error}"

    @property
    def traceback(self) -> str:
        with self._lock:
            return self._traceback

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def cancel_event(self) -> threading.Event:
        """The event handed to the engine as its ``cancel`` token."""
        return self._cancel

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finishes (never call this on the GUI thread); True when it did."""
        return self._done.wait(timeout)

    def result(self) -> Any:
        """The job's return value.

        Raises:
            RuntimeError: the job has not finished, or was cancelled.
            Exception: the engine's own exception when the job failed (chained).
        """
        state = self.state
        if not state.finished:
            raise RuntimeError(f"{self.name} has not finished (state {state.value})")
        if state is JobState.CANCELLED:
            raise RuntimeError(f"{self.name} was cancelled")
        if state is JobState.FAILED:
            raise RuntimeError(self.error_message) from self.error
        return self._result

    def cancel(self) -> None:
        """Ask the job to stop: a pending job will not start, a running one stops at its next check."""
        self._cancel.set()

    def fail(self, error: Exception) -> None:
        """Mark a finished job failed after the fact: its result could not be applied (written to MRML)."""
        self.finish(JobState.FAILED, error=error)

    # -- written by the backend ------------------------------------------------------------------------------
    def report(self, fraction: float, message: str = "") -> None:
        """The engine's progress callback, ``(fraction done, message)`` (``AttentionSegLib.progress``)."""
        with self._lock:
            self._progress = min(max(float(fraction), 0.0), 1.0)
            if message:
                self._message = str(message)

    def show_preview(self, label: int, mask: np.ndarray) -> None:
        """The engine's preview callback (``AttentionSegLib.Preview``), on the worker
        thread: keeps a copy of ``label``'s structure so far for :attr:`preview`."""
        mask = np.array(mask, dtype=bool)  # a copy: the engine goes on with its own array
        with self._lock:
            version = 1 if self._preview is None else self._preview[0] + 1
            self._preview = (version, int(label), mask)

    def mark_running(self) -> bool:
        """Called by the backend as the job starts; False (and the job cancelled) when cancel came first."""
        with self._lock:
            if self._cancel.is_set():
                self._state = JobState.CANCELLED
                self._done.set()
                return False
            self._state = JobState.RUNNING
            return True

    def finish(self, state: JobState, result: Any = None, error: BaseException | None = None) -> None:
        """Called by the backend with the job's outcome; wakes up :meth:`wait`."""
        with self._lock:
            self._state = state
            self._result = result
            self._error = error
            if error is not None:
                self._traceback = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            if state is JobState.SUCCEEDED:
                self._progress = 1.0
        self._done.set()

    def __repr__(self) -> str:
        return f"Job({self.name!r}, {self.state.value}, progress={self.progress:.2f})"


class SessionBackend(Protocol):
    """What the Logic needs from wherever the engine runs."""

    def open_session(self, volume: Any, model: Any, **options: Any) -> Job:
        """Create the interactive session for ``volume`` with ``model``; the job's result is
        ``{"num_classes": int, "labels": {label: name}}`` (what the model can segment)."""

    def run(self, name: str, calls: Sequence[SessionCall]) -> Job:
        """Run ``calls`` in order on the open session; stops at the first error; result = the last call's."""

    def cancel_all(self) -> None:
        """Cancel every pending and running job."""

    def shutdown(self) -> None:
        """Cancel everything and release the worker (the session is dropped)."""


def detach(value: Any) -> Any:
    """A copy of a result that shares no numpy memory with the session.

    The session may keep mutating its own arrays in the next job while the GUI thread is still writing the
    previous result into MRML; copying on the worker thread makes that race impossible.
    """
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {key: detach(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detach(item) for item in value)
    return value


def describe_session(session: Any) -> dict[str, Any]:
    """What the session's model segments and how it refines (plain data), from the engine's own
    ``InteractiveSession.describe()``.

    ``{"num_classes": int, "labels": {label: name}, "facts": {...}}``: the two first taken out of the
    description, the facts being the rest of it (family, network, device, refine strategy ...).
    """
    facts = detach(dict(session.describe()))
    labels = facts.pop("labels", None) or {}
    return {"num_classes": int(facts.pop("num_classes", 0)),
            "labels": {int(label): str(name) for label, name in dict(labels).items()}, "facts": facts}


class JobWorker:
    """One worker thread that runs a backend's jobs in order: submit, cancel all, shut down.

    The local and the remote backend both build on it; each says what a job does.
    """

    def __init__(self, thread_name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._jobs: list[Job] = []
        self._jobs_lock = threading.Lock()
        self._closed = False

    def cancel_all(self) -> None:
        with self._jobs_lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()

    def _stop_worker(self) -> None:
        """Refuse new jobs, cancel the queued and running ones, and let the thread go."""
        self._closed = True
        self.cancel_all()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _submit(self, name: str, work: Callable[[Job], Any]) -> Job:
        if self._closed:
            raise RuntimeError("the AttentionSeg backend has been shut down")
        job = Job(name)
        with self._jobs_lock:
            self._jobs = [j for j in self._jobs if not j.done()] + [job]
        self._executor.submit(self._execute, job, work)
        return job

    @staticmethod
    def _execute(job: Job, work: Callable[[Job], Any]) -> None:
        if not job.mark_running():
            return
        try:
            result = work(job)
        except Exception as error:  # every failure must reach the GUI, never kill the worker silently
            # an engine that honours the cancel token raises when it stops; report that as a cancellation
            state = JobState.CANCELLED if job.cancel_requested else JobState.FAILED
            job.finish(state, error=error if state is JobState.FAILED else None)
            return
        job.finish(JobState.SUCCEEDED, result=result)


class LocalBackend(JobWorker):
    """Runs the session in this process on a single worker thread.

    Args:
        session_factory: builds the session, ``session_factory(volume, model, **options)``; default
            ``AttentionSegLib.InteractiveSession`` (imported on first use, so that this module loads without
            torch).
    """

    def __init__(self, session_factory: Callable[..., Any] | None = None) -> None:
        super().__init__("AttentionSeg")
        self._session_factory = session_factory
        self._session: Any = None

    @property
    def has_session(self) -> bool:
        return self._session is not None

    @property
    def session(self) -> Any:
        """The engine session itself (for scripts and tests: read it only while no job runs)."""
        return self._session

    def open_session(self, volume: Any, model: Any, **options: Any) -> Job:
        def create(job: Job) -> dict[str, Any]:
            factory = self._session_factory
            if factory is None:
                from AttentionSegLib import InteractiveSession

                factory = InteractiveSession
            job.report(0.0, "loading the model")
            session = factory(volume, model, **options)
            self._session = session  # only once fully built: a failed start keeps the previous session
            return describe_session(session)

        return self._submit("Start session", create)

    def run(self, name: str, calls: Sequence[SessionCall]) -> Job:
        calls = tuple(calls)
        if not calls:
            raise ValueError(f"{name}: no session calls given")

        def execute(job: Job) -> Any:
            if self._session is None:
                raise RuntimeError("no interactive session is open; start a session first")
            result = None
            for call in calls:
                method = getattr(self._session, call.method, None)
                if method is None or not callable(method):
                    raise AttributeError(f"the interactive session has no method '{call.method}'")
                kwargs = dict(call.kwargs)
                if call.reports_progress:
                    kwargs.update(progress=job.report, cancel=job.cancel_event)
                if call.previews:
                    from AttentionSegLib import Preview

                    kwargs.update(preview=Preview(job.show_preview, every_s=PREVIEW_EVERY_S))
                result = method(*call.args, **kwargs)
            return detach(result)

        return self._submit(name, execute)

    def shutdown(self) -> None:
        self._stop_worker()
        self._session = None
