"""What the server does, without HTTP: open sessions, queue their calls, and render job results for clients.

:class:`Service` owns the device queue and the session store. The routes (:mod:`.app`) decode packets and
hand the payloads here; every refusal is a typed exception (:class:`~.calls.CallError`,
:class:`~.codec.PacketError`, :class:`~.patches.StalePatch`, :class:`~.store.StoreError`, :class:`NotReady`)
that the routes turn into a 4xx.
The engine is used through its public API only (``AttentionSegLib``).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import torch

from .. import Cancelled, InteractiveSession, Preview, RefineSettings, Volume, __version__, available_models
from ..interactive.medsam import MEDSAM_MODEL_NAME, MedSAMSettings, is_medsam_model
from ..json_fields import check_fields, is_int, is_number
from . import API_PREFIX, FEATURES
from .calls import CallError, invoke, parse_calls, resolve_scribbles
from .config import ServerConfig
from .jobs import FAILED, SUCCEEDED, DeviceQueue, ServerJob
from .store import ServerSession, SessionStore, StoreError

MAX_WAIT_S = 30.0
OPTIONS = frozenset({"settings", "max_history", "seed", "model_options"})


class NotReady(StoreError):
    """The session is still opening (or failed to open); HTTP 409."""

    status = 409


class ResultGone(StoreError):
    """A result the server no longer keeps (a later job of the session replaced it); HTTP 410."""

    status = 410


def describe(engine: Any) -> dict[str, Any]:
    """``{"num_classes", "labels": {label: name}, "facts"}``: what the session's model segments and how (the
    engine's own ``describe()``; labels and class count from the session where it does not name them)."""
    facts = dict(engine.describe())
    labels = facts.pop("labels", None)
    if labels is None:
        labels = getattr(getattr(engine, "model", None), "labels", None) or {}
    num_classes = facts.pop("num_classes", None)
    return {"num_classes": int(engine.num_classes if num_classes is None else num_classes),
            "labels": {str(int(k)): str(v) for k, v in dict(labels).items()}, "facts": facts}


def network_bytes(engine: Any) -> int:
    """Bytes of the session's network parameters (0 when it has no torch module to count)."""
    model = getattr(engine, "model", None)
    network = getattr(model, "network", model)
    if not isinstance(network, torch.nn.Module):
        return 0
    return sum(p.numel() * p.element_size() for p in network.parameters())


def engine_bytes(engine: Any, max_history: int) -> tuple[int, dict[str, int]]:
    """What a session's engine holds beside its image: the network and its undo copies, the bounds of the
    session's own caches, and the process-wide caches it uses (``{name: bound}``), from the family's
    ``cache_bounds()`` where it has one (LiteMedSAM: its decoder tokens, and the image embeddings every
    session of the process shares)."""
    own, shared = 0, {}
    bounds = getattr(getattr(engine, "family", None), "cache_bounds", None)
    if callable(bounds):
        own, shared = bounds()
    return network_bytes(engine) * (max_history + 2) + int(own), dict(shared)


def detach(value: Any) -> Any:
    """A copy that shares no numpy memory with the session (the next job may change its arrays)."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {key: detach(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [detach(item) for item in value]
    return value


class Service:
    """The server's work: sessions on one device, one job at a time.

    Args:
        config: limits and defaults.
        device: the torch device every session runs on.
    """

    def __init__(self, config: ServerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.queue = DeviceQueue(str(device), lambda error: isinstance(error, Cancelled))
        self.store = SessionStore(config, self.queue, on_close=self._released)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="attentionseg-expiry", daemon=True)
        self._sweeper.start()

    # -- server ----------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {"status": "ok", "server": "attentionseg", "version": __version__, "api": API_PREFIX,
                "device": str(self.device), "mixed_precision": self.device.type == "cuda",
                "sessions": len(self.store), "max_sessions": self.config.max_sessions,
                "queue": len(self.queue), "idle_timeout_s": self.config.idle_timeout_s,
                "max_upload_bytes": self.config.max_upload_bytes,
                "max_memory_bytes": self.config.max_memory_bytes,
                "estimated_bytes": self.store.estimated_bytes,
                "token_required": self.config.token is not None, "features": list(FEATURES)}

    @staticmethod
    def models() -> list[dict[str, str]]:
        return [{"name": name, "task": entry.task, "description": entry.description}
                for name, entry in sorted(available_models().items())]

    def stop(self) -> None:
        self._stop.set()
        self.queue.stop()
        self.store.close_all()

    def _sweep(self) -> None:
        interval = min(5.0, max(0.05, self.config.idle_timeout_s / 4))
        while not self._stop.wait(interval):
            self.store.expire_idle()

    def _released(self, session: ServerSession) -> None:
        if self.device.type == "cuda" and not session.busy:
            torch.cuda.empty_cache()

    # -- sessions --------------------------------------------------------------------------------------------
    def open_session(self, payload: Any) -> tuple[ServerSession, ServerJob]:
        """Check the upload, reserve a session and queue its opening (loading the model on the device)."""
        if not isinstance(payload, dict) or not {"image", "model"} <= set(payload) <= {"image", "model",
                                                                                       "options"}:
            raise CallError("a new session needs {'image': {...}, 'model': NAME or network config, "
                            "'options': {...}}")
        volume = self._volume(payload["image"])
        model = self._model(payload["model"])
        options = self._options(payload.get("options") or {}, model)
        session = self.store.reserve(volume.shape, volume.array.dtype.itemsize, options["max_history"])

        def open_engine(job: ServerJob) -> dict[str, Any]:
            try:
                job.report(0.0, "loading the model")
                engine = InteractiveSession(volume, model, device=self.device, **options)
                self.store.add_bytes(session, *engine_bytes(engine, options["max_history"]))
            except BaseException:
                session.estimated_bytes = 0  # a session that did not open holds nothing
                raise
            session.engine = engine
            return describe(engine)

        job = ServerJob(session.id, "Start session", open_engine)
        self.store.submit(session, job)
        return session, job

    def _volume(self, image: Any) -> Volume:
        if not isinstance(image, dict) or not isinstance(image.get("array"), np.ndarray) or \
                not set(image) <= {"array", "spacing", "origin", "direction"}:
            raise CallError("'image' must be {'array': <array>, 'spacing': [...], 'origin': [...], "
                            "'direction': [...]}")
        array = image["array"]
        if array.ndim not in (2, 3) or array.size == 0 or array.dtype == np.bool_:
            raise CallError(f"the image must be a non-empty 2D or 3D array of numbers, got shape "
                            f"{array.shape} of {array.dtype}")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CallError("the image holds NaN or infinite voxels")
        geometry = {}
        for key in ("spacing", "origin", "direction"):
            value = image.get(key, [])
            if not isinstance(value, list) or not all(is_number(v) for v in value):
                raise CallError(f"image {key} must be a list of finite numbers, got {value!r}")
            geometry[key] = tuple(float(v) for v in value)
        try:
            return Volume(array, **geometry)
        except ValueError as error:
            raise CallError(str(error)) from None

    @staticmethod
    def _model(model: Any) -> Any:
        if isinstance(model, dict):
            return model  # a network config: an untrained network (the registry checks name and keys)
        if isinstance(model, str):
            names = available_models()
            if model in names:
                return model
            raise CallError(f"unknown model {model!r}: the server has {sorted(names)} (a model is chosen by "
                            "name; the server never reads a path sent by a client; `attentionseg models "
                            "import NAME FILE` on the server adds one)")
        raise CallError("'model' must be the name of one of the server's models or a network config object")

    def _options(self, options: Any, model: Any) -> dict[str, Any]:
        if not isinstance(options, dict) or not set(options) <= OPTIONS:
            raise CallError(f"'options' may hold {sorted(OPTIONS)} only, got {sorted(options)}")
        history = options.get("max_history", min(20, self.config.max_history))
        if not is_int(history) or not 1 <= history <= self.config.max_history:
            raise CallError(f"max_history must be an integer 1..{self.config.max_history}, got {history!r}")
        seed = options.get("seed", 0)
        if not is_int(seed):
            raise CallError(f"seed must be an integer, got {seed!r}")
        return {"settings": self._settings(options.get("settings")), "max_history": history, "seed": seed,
                "model_options": self._model_options(options.get("model_options"), model)}

    @staticmethod
    def _model_options(values: Any, model: Any) -> dict[str, Any] | None:
        """LiteMedSAM's settings (``MedSAMSettings`` fields), checked before the session starts."""
        if values is None:
            return None
        if not is_medsam_model(model):
            raise CallError(f"model_options are LiteMedSAM's ('{MEDSAM_MODEL_NAME}'); the model {model!r} "
                            "takes none")
        try:
            MedSAMSettings.from_dict(values)
        except ValueError as error:
            raise CallError(f"model_options: {error}") from None
        return dict(values)

    @staticmethod
    def _settings(settings: Any) -> RefineSettings | None:
        if settings is None:
            return None
        fields = {f.name for f in dataclasses.fields(RefineSettings)}
        if not isinstance(settings, dict) or not set(settings) <= fields:
            unknown = sorted(set(settings) - fields) if isinstance(settings, dict) else settings
            raise CallError(f"unknown refine settings {unknown!r}; the settings are {sorted(fields)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
        try:
            check_fields(RefineSettings, values, "refine setting")
            return RefineSettings(**values)
        except (TypeError, ValueError) as error:
            raise CallError(f"refine settings: {error}") from None

    def close_session(self, session_id: str) -> None:
        self.store.close(session_id)

    def session_info(self, session_id: str) -> dict[str, Any]:
        session = self.store.get(session_id)
        jobs = [job.status(self.queue.position(job)) for job in self.store.jobs_of(session)]
        return {"session_id": session.id, "shape": list(session.shape), "open": session.engine is not None,
                "estimated_bytes": session.estimated_bytes, "jobs": jobs}

    def mask(self, session_id: str) -> dict[str, Any]:
        """The mask as last sent to the client, whole (a client whose copy fell behind resynchronises)."""
        session = self.store.get(session_id)
        with session.lock:
            return {"mask": session.mask.snapshot()}

    # -- jobs ------------------------------------------------------------------------------------------------
    def submit(self, session_id: str, payload: Any) -> tuple[ServerSession, ServerJob]:
        """Check the calls, turn scribble patches into maps, and queue them as one job."""
        session = self.store.get(session_id)
        if session.engine is None:
            raise NotReady(f"session {session_id} is not open yet (wait for its start job) or failed to open")
        if not isinstance(payload, dict) or not set(payload) <= {"name", "calls", "preview_every_s"}:
            raise CallError("a job is {'name': str, 'calls': [{'method': ..., 'args': [...], "
                            "'kwargs': {...}}], 'preview_every_s': seconds (optional)}")
        name = payload.get("name") or "Job"
        if not isinstance(name, str) or len(name) > 64:
            raise CallError("a job's name must be a string of at most 64 characters")
        every_s = payload.get("preview_every_s")
        if every_s is not None and not (is_number(every_s) and every_s >= 0):
            raise CallError(f"'preview_every_s' must be a number of seconds >= 0, got {every_s!r}")
        calls = parse_calls(payload.get("calls"))
        with session.lock:
            resolve_scribbles(calls, session.scribbles.apply)

        def run(job: ServerJob) -> Any:
            preview = None if every_s is None else Preview(job.show_preview, every_s=float(every_s))
            result = None
            for call in calls:
                result = invoke(session.engine, call, job.report, job.cancel_event, preview)
            return detach(result)

        job = ServerJob(session.id, name, run)
        for older in self.store.jobs_of(session):
            if older.finished:
                older.result = ResultGone  # only the latest result is kept (it may be large)
        self.store.submit(session, job)
        return session, job

    def cancel(self, job_id: str) -> dict[str, Any]:
        _, job = self.store.job(job_id)
        self.queue.cancel(job)
        return job.status(self.queue.position(job))

    def wait(self, job_id: str, timeout: float, preview_after: int | None = None) -> dict[str, Any]:
        """The job's status after waiting up to ``timeout`` s for it to finish (or, with ``preview_after``,
        for a preview newer than that version, which the status then carries); with its result once done."""
        session, job = self.store.job(job_id)
        return self.render(session, job, timeout, preview_after)

    def render(self, session: ServerSession, job: ServerJob, timeout: float,
               preview_after: int | None = None) -> dict[str, Any]:
        job.wait(min(timeout, MAX_WAIT_S), preview_after)
        status = job.status(self.queue.position(job), preview_after)
        if job.state == FAILED and session.engine is None:
            self._forget(session)  # it never opened: free its place now that the client knows why
        if job.state != SUCCEEDED:
            return status
        result = job.result
        if result is ResultGone:
            raise ResultGone(f"the result of job {job.id} is no longer kept: a later job of the session "
                             "replaced it")
        if isinstance(result, np.ndarray) and result.dtype == np.uint8 and result.shape == session.shape:
            with session.lock:
                status.update(result_kind="mask", result=session.mask.diff(result))
        elif isinstance(result, bytes):
            status.update(result_kind="checkpoint", result=result)
        else:
            status.update(result_kind="value", result=result)
        return status

    def _forget(self, session: ServerSession) -> None:
        try:
            self.store.close(session.id, "failed to open")
        except StoreError:
            pass
