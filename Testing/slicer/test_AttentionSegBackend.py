"""The backend seam: jobs run off the calling thread, in order, report progress, cancel, and capture errors.

The backend runs methods of whatever its factory builds; these tests give it a small counter object of
their own so that timing and failures are under the test's control. The real engine session runs through it
in ``test_AttentionSegController.py``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from AttentionSegBackend import Job, JobState, LocalBackend, SessionCall

WAIT_S = 10.0


class Counter:
    """A stand-in workload: a value to add to, a slow loop that honours progress and cancel, and a failure."""

    def __init__(self, start: int, model: Any = None, step: int = 1) -> None:
        self.value = start
        self.step = step
        self.threads: list[str] = []
        self.array = np.zeros(3)

    def add(self, amount: int = 1) -> int:
        self.threads.append(threading.current_thread().name)
        self.value += amount * self.step
        return self.value

    def count_slowly(self, steps: int, *, progress: Any, cancel: threading.Event) -> int:
        for done in range(steps):
            if cancel.is_set():
                raise InterruptedError("stopped by the cancel token")
            time.sleep(0.01)
            progress((done + 1) / steps, f"{done + 1} of {steps}")
        return steps

    def fit(self, steps: int, *, progress: Any, cancel: threading.Event) -> int:
        for done in range(steps):
            time.sleep(0.01)
            progress((done + 1) / steps, f"step {done + 1}")
        return steps

    def broken(self) -> None:
        raise ZeroDivisionError("the engine divided by zero")

    def describe(self) -> dict:
        return {}

    def filled_array(self) -> np.ndarray:
        self.array[:] = 7
        return self.array


@pytest.fixture
def backend() -> LocalBackend:
    backend = LocalBackend(session_factory=Counter)
    job = backend.open_session(10, None, step=2)
    assert job.wait(WAIT_S) and job.state is JobState.SUCCEEDED
    yield backend
    backend.shutdown()


def finished(job: Job) -> Job:
    assert job.wait(WAIT_S), f"{job} did not finish"
    return job


def test_calls_run_in_order_on_a_worker_thread(backend: LocalBackend) -> None:
    jobs = [backend.run(f"add {n}", [SessionCall("add", (n,))]) for n in (1, 2, 3)]

    results = [finished(job).result() for job in jobs]

    assert results == [12, 16, 22]  # 10 + 2*1, then + 2*2, then + 2*3
    session = backend._session
    assert all(name.startswith("AttentionSeg") for name in session.threads)
    assert threading.current_thread().name not in session.threads


def test_steps_of_one_job_share_it_and_it_returns_the_last(backend: LocalBackend) -> None:
    job = backend.run("two steps", [SessionCall("add", (1,)), SessionCall("add", (3,))])

    assert finished(job).result() == 18


def test_progress_is_reported_in_the_engine_convention(backend: LocalBackend) -> None:
    seen: list[float] = []
    job = backend.run("slow", [SessionCall("count_slowly", (20,), reports_progress=True)])
    while not job.done():
        seen.append(job.progress)
        time.sleep(0.005)

    assert finished(job).state is JobState.SUCCEEDED
    assert job.progress == 1.0
    assert any(0.0 < p < 1.0 for p in seen)
    assert seen == sorted(seen)


def test_progress_may_come_as_a_fraction_with_a_message(backend: LocalBackend) -> None:
    job = backend.run("fit", [SessionCall("fit", (5,), reports_progress=True)])

    assert finished(job).state is JobState.SUCCEEDED
    assert job.progress == 1.0
    assert job.message == "step 5"


def test_opening_a_session_tells_what_it_segments() -> None:
    class Labelled(Counter):
        def describe(self) -> dict:
            return {"num_classes": 3, "labels": {1: "liver", 2: "pancreas"}}

    backend = LocalBackend(session_factory=Labelled)
    try:
        job = finished(backend.open_session(0, None))
        assert job.result() == {"num_classes": 3, "labels": {1: "liver", 2: "pancreas"}, "facts": {}}
    finally:
        backend.shutdown()


def test_opening_a_session_passes_on_the_engines_own_description() -> None:
    class Described(Counter):
        num_classes = 2

        def describe(self) -> dict:
            return {"family": "unet", "strategy": "online_head"}

    backend = LocalBackend(session_factory=Described)
    try:
        job = finished(backend.open_session(0, None))
        assert job.result()["facts"] == {"family": "unet", "strategy": "online_head"}
    finally:
        backend.shutdown()


def test_cancel_stops_a_running_job(backend: LocalBackend) -> None:
    job = backend.run("slow", [SessionCall("count_slowly", (10_000,), reports_progress=True)])
    while job.progress == 0.0:
        time.sleep(0.005)

    job.cancel()

    assert finished(job).state is JobState.CANCELLED
    assert job.error is None
    with pytest.raises(RuntimeError, match="slow was cancelled"):
        job.result()


def test_a_job_cancelled_before_it_starts_never_runs(backend: LocalBackend) -> None:
    blocker = backend.run("slow", [SessionCall("count_slowly", (30,), reports_progress=True)])
    queued = backend.run("add", [SessionCall("add", (100,))])

    queued.cancel()

    assert finished(queued).state is JobState.CANCELLED
    assert finished(blocker).state is JobState.SUCCEEDED
    assert backend._session.value == 10


def test_cancel_all_reaches_every_job(backend: LocalBackend) -> None:
    slow = [SessionCall("count_slowly", (10_000,), reports_progress=True)]
    jobs = [backend.run("slow", slow) for _ in range(3)]

    backend.cancel_all()

    assert [finished(job).state for job in jobs] == [JobState.CANCELLED] * 3


def test_an_error_is_captured_with_its_message_and_the_worker_lives_on(backend: LocalBackend) -> None:
    job = backend.run("Refine", [SessionCall("broken")])

    assert finished(job).state is JobState.FAILED
    assert job.error_message == "Refine failed: ZeroDivisionError: the engine divided by zero"
    assert "in broken" in job.traceback
    with pytest.raises(RuntimeError, match="Refine failed") as raised:
        job.result()
    assert isinstance(raised.value.__cause__, ZeroDivisionError)
    assert finished(backend.run("add", [SessionCall("add")])).result() == 12


def test_a_failing_step_stops_the_steps_after_it(backend: LocalBackend) -> None:
    job = backend.run("two steps", [SessionCall("broken"), SessionCall("add", (100,))])

    assert finished(job).state is JobState.FAILED
    assert backend._session.value == 10


def test_unknown_method_is_a_clear_error(backend: LocalBackend) -> None:
    job = backend.run("typo", [SessionCall("ad")])

    assert finished(job).state is JobState.FAILED
    assert "has no method 'ad'" in job.error_message


def test_results_share_no_memory_with_the_session(backend: LocalBackend) -> None:
    result = finished(backend.run("array", [SessionCall("filled_array")])).result()

    backend._session.array[:] = -1

    np.testing.assert_array_equal(result, [7, 7, 7])


def test_without_a_session_calls_fail_clearly() -> None:
    backend = LocalBackend(session_factory=Counter)
    try:
        job = finished(backend.run("add", [SessionCall("add")]))
        assert job.state is JobState.FAILED
        assert "start a session first" in job.error_message
    finally:
        backend.shutdown()


def test_a_session_that_fails_to_start_keeps_the_previous_one(backend: LocalBackend) -> None:
    bad = finished(backend.open_session(99, None, unknown=True))

    assert bad.state is JobState.FAILED
    assert "unexpected keyword argument 'unknown'" in bad.error_message
    assert finished(backend.run("add", [SessionCall("add")])).result() == 12  # the fixture's session


def test_a_shut_down_backend_refuses_work() -> None:
    backend = LocalBackend(session_factory=Counter)
    backend.shutdown()

    with pytest.raises(RuntimeError, match="shut down"):
        backend.run("add", [SessionCall("add")])
