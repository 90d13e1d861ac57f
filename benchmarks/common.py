"""What every benchmark shares: the machine it ran on, a results writer, a timing helper, and a server.

Results follow ``docs/benchmarks.md`` (shared docs), "Conventions": one JSON file
``{"benchmark", "commit", "machine", "records", ...}`` whose records are flat objects with at least
``method``, ``dataset``, ``metric`` and ``value``, plus a short markdown table beside it (same name, ``.md``).
Both are written atomically (a temporary file in the same folder, then ``os.replace``), so an interrupted run
never leaves a half-written result behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from AttentionSegLib.atomic import write_text_atomically
from AttentionSegLib.devices import cpu_has_native_bfloat16

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_FIELDS = ("method", "dataset", "metric", "value")


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """The checked-out commit (with ``-dirty`` when the work tree has changes), or ``None`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if status else head


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The machine a benchmark ran on: cpu, its vector instructions as PyTorch uses them, whether it
    multiplies bfloat16 in hardware, core and thread counts, torch version, device, commit, load.

    Args:
        device: the device the benchmark computed on (``"auto"`` is resolved as the engine resolves it).
    """
    if str(device) == "auto":
        from AttentionSegLib import resolve_device

        device = resolve_device("auto")
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512
        "cpu_native_bfloat16": cpu_has_native_bfloat16(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "commit": git_commit(),
    }
    if hasattr(os, "getloadavg"):  # timings on a shared machine mean little without it
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _json_safe(value: Any) -> Any:
    """Non-finite floats become ``null`` (JSON has no NaN or infinity); numpy
    scalars become Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for index, record in enumerate(records):
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        if missing:
            raise ValueError(f"write_results: record {index} lacks {missing} (every record needs "
                             f"{list(REQUIRED_FIELDS)}): {dict(record)}")
        checked.append(dict(record))
    return checked


def write_results(name: str, records: Iterable[Mapping[str, Any]], out_json: str | os.PathLike, table_md: str,
                  extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write a benchmark's results: ``out_json`` and, beside it, ``table_md`` as ``<out_json stem>.md``.

    Args:
        name: the benchmark's name (``"interactive"``, ``"acdc"``, ...).
        records: flat objects with at least ``method``, ``dataset``, ``metric``, ``value``.
        out_json: the JSON file to write (its folder is created).
        table_md: the markdown table (text).
        extra: more top-level entries (settings, per-case numbers, notes). ``extra["machine"]``, when given,
            replaces the machine description that is otherwise taken on the CPU.

    Returns:
        The paths of the JSON and markdown files.

    Raises:
        ValueError: a record lacks a required field, or ``extra`` tries to replace ``benchmark``/``records``.
    """
    rows = _check_records(records)
    extra = dict(extra or {})
    clash = {"benchmark", "commit", "records"} & set(extra)
    if clash:
        raise ValueError(f"write_results: extra may not replace {sorted(clash)}")
    machine = extra.pop("machine", None) or machine_info("cpu")
    document = {"benchmark": name, "commit": machine.get("commit") or git_commit(), "machine": machine,
                "records": rows, **extra}
    out_json = Path(out_json)
    out_md = out_json.with_suffix(".md")
    write_text_atomically(out_json, json.dumps(_json_safe(document), indent=2, allow_nan=False) + "\n")
    write_text_atomically(out_md, table_md if table_md.endswith("\n") else table_md + "\n")
    return out_json, out_md


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs.

    On CUDA the device is synchronised around every run, so asynchronous kernels are counted.
    """
    if repeats < 1:
        raise ValueError(f"median_time: repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(max(warmup, 0)):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran benchmark ``script`` (its ``__file__``) with ``argv`` (``None``: the process's
    own arguments), as the results record it: ``python benchmarks/<script> ARGS``."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *args])


def add_ct_organ_options(parser: argparse.ArgumentParser, name: str) -> None:
    """The options of a benchmark on the ``ct_organs`` targets of ``interactive.py``: ``--data``, ``--limit``
    (example CTs), ``--device``, ``--threads``, ``--out`` (default ``results/<name>.json``)."""
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--limit", type=int, default=2, help="example CTs to use (default: 2, both)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / f"{name}.json",
                        help=f"JSON to write; the table goes beside it as .md (default: benchmarks/results/"
                             f"{name}.json)")


def device_of(args: argparse.Namespace) -> torch.device:
    """The device of :func:`add_ct_organ_options`' ``--device``, torch's CPU threads set to ``--threads``."""
    from AttentionSegLib.devices import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A GitHub markdown table; floats are shown with 3 decimals, ``None`` as an en dash."""

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return "–" if not math.isfinite(value) else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@contextmanager
def running_server(threads: int, device: str, *args: str,
                   engine: str | os.PathLike = REPO_ROOT) -> Iterator[str]:
    """``attentionseg serve`` of ``engine`` (a checkout: its ``AttentionSegLib``) on a free loopback port with
    ``threads`` torch threads (0: PyTorch's default); its URL; stopped (and waited for) afterwards."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(engine), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    process = subprocess.Popen([sys.executable, "-m", "AttentionSegLib.cli", "serve", "--port", "0",
                                "--device", device, *args], cwd=engine, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline() if process.stdout is not None else ""
        found = re.search(r"listening on (http://\S+) ", line)
        if not found:
            raise RuntimeError(f"the server did not start: {line!r}")
        yield found.group(1)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
