"""Self-describing run folders: run.json (config, git commit, versions, device), the metrics log, device choice.

A run folder looks like

    run_dir/
      run.json          resolved config + provenance; a "resumes" list grows on each --resume
      metrics.jsonl     one JSON object per line: {"step": int, "time": unix seconds, <scalars>}
      samples/          grids written during training (step_000200.png, ...)
      checkpoints/      model / training-state folders

Nothing here imports transformers or datasets: their versions come from package metadata.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from parti.checkpoint import read_json, write_json
from parti.errors import PartiError

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
METRICS_NAME = "metrics.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
VERSIONED_PACKAGES = ("torch", "transformers", "accelerate", "datasets", "numpy", "parti")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# Provenance: git, library versions, device


def git_info() -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} for the repo this package's source lives in.

    Only a repo whose top level holds this package (top/parti/) counts: an installed copy inside some
    unrelated repo (a venv in a project folder) must not report that project's commit. Never raises.
    """
    package_dir = Path(__file__).resolve().parent
    none = {"commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):  # git missing, hung, or not executable
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() / package_dir.name != package_dir:
        return none
    commit = git("rev-parse", "HEAD")  # None in a repo with no commits yet
    if commit is None:
        return none
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def library_versions() -> dict[str, str | None]:
    """Versions of python and the libraries a run depends on; None for one that is not installed."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["parti"] is None:  # running from a checkout that was never pip-installed
        versions["parti"] = _pyproject_version()
    return versions


def _pyproject_version() -> str | None:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        return tomllib.loads(pyproject.read_text())["project"]["version"]
    except (OSError, KeyError, ValueError, ImportError):
        return None


def detect_device() -> dict[str, Any]:
    """The hardware a run uses: {"type": "cuda"|"mps"|"cpu", "name", "count", ...}. Pure query, no logging."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        props = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "capability": f"{major}.{minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return {"type": "mps", "name": "Apple MPS", "count": 1}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count() or 1}


def choose_mixed_precision() -> str:
    """Accelerate's mixed_precision string: "bf16" on Ampere+ CUDA, "fp16" on older CUDA, "no" elsewhere.

    Decided by compute capability, not torch.cuda.is_bf16_supported(): that returns True on a T4 (sm75)
    where bf16 is only emulated and slow.
    """
    if torch.cuda.is_available():
        choice = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"
        log.info("mixed precision: %s on %s", choice, torch.cuda.get_device_name(0))
    else:
        choice = "no"
        log.info("mixed precision: no (fp32) on %s", detect_device()["type"])
    return choice


# ---------------------------------------------------------------------------------------------------------------
# Run folder


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """{dotted.key: [old, new]} for every leaf that differs; a key missing on one side shows as None."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return {k: [flat_old.get(k), flat_new.get(k)] for k in sorted(set(flat_old) | set(flat_new))
            if flat_old.get(k) != flat_new.get(k)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v  # compare as JSON would store it
    return out


class RunFolder:
    """Create or reopen a run folder and record where the run came from in run.json.

    New folder (or one holding a run that never logged a metric nor saved a checkpoint): run.json is
    written fresh. Folder holding a run with progress: `resume=True` keeps run.json and appends a "resumes"
    entry (time, argv, git, versions, device, config changes); `resume=False` is a PartiError, whether or
    not the config differs, so a forgotten --resume never overwrites hours of checkpoints and metrics.
    """

    def __init__(self, path: str | Path, *, config: dict[str, Any], resume: bool, mixed_precision: str | None = None):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise PartiError(f"--out {self.path} is a file; give a folder for the run")
        config = json.loads(json.dumps(config))  # JSON-normalised copy: tuples -> lists, caller's dict untouched
        precision = mixed_precision or choose_mixed_precision()
        entry = {
            "time": _now(),
            "argv": list(sys.argv),
            "git": git_info(),
            "versions": library_versions(),
            "device": {**detect_device(), "mixed_precision": precision},
        }
        run_json = self.path / RUN_JSON
        self.resumed = False
        if run_json.exists():
            old = read_json(run_json)
            changes = config_changes(old.get("config", {}), config)
            if resume:
                self.resumed = True
                data = {**old, "resumes": [*old.get("resumes", []), {**entry, "config_changes": changes}]}
                if changes:
                    log.warning("resuming %s with config changes: %s", self.path, _describe(changes))
            elif self._has_progress():
                if changes:
                    raise PartiError(f"{self.path} holds a run with a different config ({_describe(changes)}); "
                                     f"pass --resume to continue it, or choose another --out")
                raise PartiError(f"{self.path} already holds this run; pass --resume to continue it, "
                                 f"or choose another --out to start afresh")
            else:
                data = None  # an earlier start that did nothing: start over
        else:
            data = None
        if data is None:
            data = {"config": config, "started": entry.pop("time"), **entry, "resumes": []}
        for sub in (SAMPLES_DIR, CHECKPOINTS_DIR):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        write_json(run_json, data)
        self.info = data  # the run.json content
        self.config = data["config"]  # resolved config the run was created with (the old one on resume)
        self.mixed_precision = precision

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def samples_dir(self) -> Path:
        return self.path / SAMPLES_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def _has_progress(self) -> bool:
        metrics = self.metrics_path
        has_metrics = metrics.exists() and metrics.stat().st_size > 0
        ckpts = self.checkpoints_dir
        return has_metrics or (ckpts.is_dir() and any(ckpts.iterdir()))

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, resumed={self.resumed})"


def _describe(changes: dict[str, list[Any]], limit: int = 4) -> str:
    parts = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:limit]]
    more = len(changes) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------------------------
# Metrics log


class MetricsLogger:
    """Append-only JSONL metrics: `log(step, loss=..., lr=...)` writes {"step", <scalars>, "time"} and flushes.

    Each line goes out in one write and is flushed, so a reader sees whole lines (bar a kill mid-write);
    fsync runs at most every `fsync_every` seconds and on close. Opening drops a partial last line left by
    a killed run, so new lines never glue onto it. Only the main process of a multi-GPU run should log.
    """

    def __init__(self, path: str | Path, *, fsync_every: float = 5.0):
        self.path = Path(path)
        self.fsync_every = fsync_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._last_sync = time.monotonic()

    def log(self, step: int, **scalars: Any) -> dict[str, Any]:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        if "time" in scalars:
            raise ValueError("'time' is written by MetricsLogger; use another name")
        record = {"step": step, **{k: _plain(k, v) for k, v in scalars.items()}, "time": round(time.time(), 3)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if time.monotonic() - self._last_sync >= self.fsync_every:
            os.fsync(self._file.fileno())
            self._last_sync = time.monotonic()
        return record

    def truncate_after(self, step: int) -> int:
        """Drop lines with "step" > `step` (a resumed run re-logs them); return how many were dropped."""
        self._file.close()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(self.path, tmp)  # mkstemp makes 0600 files; keep the log's own permissions
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        return len(lines) - len(kept)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(key: str, value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers; strings (e.g. split="val") pass through."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalar / 0-d array
        return value.item()
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    raise TypeError(f"metric {key!r} must be a number or string, got {type(value).__name__}")


def _step_of(line: str) -> int | None:
    """The line's step, or None for a line that is not a whole JSON object with an int step."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _drop_partial_last_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1  # 0 when the only line is partial
        if _step_of(data[keep:].decode("utf-8", errors="replace")) is not None:
            f.write(b"\n")  # a whole record that only lacks its newline: keep it
            return
        log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", path, len(data) - keep)
        f.truncate(keep)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL, in file order. A truncated or corrupt line is skipped with a warning."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise PartiError(f"{path} not found; give a run folder's {METRICS_NAME}") from None
    except IsADirectoryError:
        raise PartiError(f"{path} is a folder; give a {METRICS_NAME} file") from None
    records = []
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines) and not text.endswith("\n"):
                log.info("%s: ignoring a partial last line (the run was interrupted mid-write)", path)
            else:
                log.warning("%s: skipping unreadable line %d", path, number)
            continue
        records.append(record)
    return records
