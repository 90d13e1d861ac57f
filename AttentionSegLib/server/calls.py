"""Which methods of the interactive session a client may call over HTTP, and with which arguments.

Every call is checked here, before it is queued: an unknown method, an unknown or missing argument, or a value
of the wrong kind is a :class:`CallError` (HTTP 422) that names the method and the argument. Nothing here
takes a path: ``save_model`` takes no argument on the server (the checkpoint comes back in the response), and
scribble maps arrive as :mod:`.patches`.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..json_fields import is_int, is_number

#: a scribble map argument (a patch against the session's scribble mirror), resolved by the store
SCRIBBLES = "scribbles"
MAX_CALLS = 16
MAX_LABELS = 255


class CallError(ValueError):
    """A call the server will not run; the message says which argument is wrong and why."""


@dataclass(frozen=True)
class MethodSpec:
    """One callable session method.

    Attributes:
        signature: its parameters (names, defaults) as a client may pass them.
        kinds: ``{parameter: kind}``, the kind checked by :func:`_check_value`.
        reports_progress: the method takes ``progress=`` and ``cancel=``.
        previews: the method takes ``preview=`` (a click or a box, whose structure LiteMedSAM propagates over
            seconds).
    """

    signature: inspect.Signature
    kinds: dict[str, str]
    reports_progress: bool = False
    previews: bool = False


def _spec(parameters: list[tuple[str, str, Any]], progress: bool = False, previews: bool = False
          ) -> MethodSpec:
    empty = inspect.Parameter.empty
    signature = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=empty if d is ... else d)
        for name, _, d in parameters])
    return MethodSpec(signature, {name: kind for name, kind, _ in parameters}, progress, previews)


METHODS: dict[str, MethodSpec] = {
    "click": _spec([("point_ijk", "point", ...), ("label", "label", 1), ("positive", "bool", True)], True,
                   previews=True),
    "box": _spec([("corner_a_ijk", "point", ...), ("corner_b_ijk", "point", ...), ("label", "label", 1)],
                 True, previews=True),
    "set_bounds": _spec(
        [("corner_a_ijk", "point", ...), ("corner_b_ijk", "point", ...), ("label", "label", 1)], True),
    "clear_bounds": _spec([("label", "label", ...)]),
    "prefetch": _spec([("point_ijk", "point", ...)], True),
    "add_scribbles": _spec([("scribble_map", SCRIBBLES, ...), ("replace", "bool", False)]),
    "clear_scribbles": _spec([]),
    "refine": _spec([("time_budget_s", "seconds", 10.0), ("scribbles", SCRIBBLES, None),
                     ("replace", "bool", False)], True),
    "segment": _spec([], True),
    "undo": _spec([]),
    "redo": _spec([]),
    "lock": _spec([("labels", "labels", ...)]),
    "unlock": _spec([("labels", "labels", ...)]),
    "attention_maps": _spec([]),
    "uncertainty": _spec([]),
    "describe": _spec([]),
    "save_model": _spec([]),
}


@dataclass
class Call:
    """A checked call: the method and its arguments by name (scribble arguments still as patches)."""

    method: str
    arguments: dict[str, Any]

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]


def parse_calls(raw: Any) -> list[Call]:
    """``[{"method": ..., "args": [...], "kwargs": {...}}, ...]`` as checked :class:`Call` objects."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CALLS:
        raise CallError(f"'calls' must be a list of 1 to {MAX_CALLS} calls")
    return [parse_call(item, n) for n, item in enumerate(raw)]


def parse_call(raw: Any, index: int = 0) -> Call:
    if not isinstance(raw, dict) or not set(raw) <= {"method", "args", "kwargs"}:
        raise CallError(f"call {index}: must be an object with 'method', 'args' and 'kwargs'")
    method = raw.get("method")
    if method == "save_model" and (raw.get("args") or raw.get("kwargs")):
        raise CallError("save_model takes no path: the server never writes where a client says; the "
                        "checkpoint comes back in the response")
    if method not in METHODS:
        raise CallError(f"call {index}: unknown method {method!r}; the session methods are "
                        f"{sorted(METHODS)}")
    args, kwargs = raw.get("args", []), raw.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise CallError(f"{method}: 'args' must be a list and 'kwargs' an object")
    spec = METHODS[method]
    try:
        bound = spec.signature.bind(*args, **kwargs)
    except TypeError as error:
        raise CallError(f"{method}: {error} (parameters: {list(spec.signature.parameters)})") from None
    bound.apply_defaults()
    arguments = {name: _check_value(method, name, spec.kinds[name], value)
                 for name, value in bound.arguments.items()}
    return Call(method, arguments)


def _check_value(method: str, name: str, kind: str, value: Any) -> Any:
    where = f"{method}: {name}"
    if kind == SCRIBBLES:
        if value is None and method == "refine":
            return None
        if not isinstance(value, dict) or value.get("kind") not in ("patch", "full"):
            raise CallError(f"{where} must be a scribble patch {{'kind': 'patch' | 'full', ...}}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise CallError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "label":
        if not is_int(value) or not 0 <= value <= MAX_LABELS:
            raise CallError(f"{where} must be an integer label 0..{MAX_LABELS}, got {value!r}")
        return int(value)
    if kind == "labels":
        labels = [value] if is_int(value) else value
        if not isinstance(labels, list) or len(labels) > MAX_LABELS or \
                not all(is_int(v) and 0 <= v <= MAX_LABELS for v in labels):
            raise CallError(f"{where} must be a label or a list of labels 0..{MAX_LABELS}, got {value!r}")
        return [int(v) for v in labels]
    if kind == "point":
        if not isinstance(value, list) or len(value) not in (2, 3) or not all(map(is_number, value)):
            raise CallError(f"{where} must be 2 or 3 finite numbers (i, j, k), got {value!r}")
        return tuple(float(v) if isinstance(v, float) else int(v) for v in value)
    if kind == "seconds":
        if not is_number(value):
            raise CallError(f"{where} must be a finite number of seconds, got {value!r}")
        return float(value)
    raise AssertionError(f"unknown argument kind {kind}")  # pragma: no cover - a typo in METHODS


def resolve_scribbles(calls: list[Call], resolve: Callable[[dict[str, Any]], Any]) -> None:
    """Replace every scribble patch argument by the map ``resolve`` makes of it (in call order)."""
    for call in calls:
        for name, kind in call.spec.kinds.items():
            if kind == SCRIBBLES and isinstance(call.arguments.get(name), dict):
                call.arguments[name] = resolve(call.arguments[name])


def invoke(session: Any, call: Call, progress: Callable[..., None], cancel: Any, preview: Any = None) -> Any:
    """Run ``call`` on the engine session; ``save_model`` returns the checkpoint's bytes (written to a
    temporary folder of the server's own, then removed). ``preview`` (an ``AttentionSegLib.Preview``) goes to
    the methods that show a structure as it grows."""
    if call.method == "save_model":
        with tempfile.TemporaryDirectory(prefix="attentionseg-serve-") as folder:
            return Path(session.save_model(Path(folder) / "adapted_model.pt")).read_bytes()
    arguments = dict(call.arguments)
    if call.spec.reports_progress:
        arguments.update(progress=progress, cancel=cancel)
    if call.spec.previews and preview is not None:
        arguments["preview"] = preview
    return getattr(session, call.method)(**arguments)
