"""Self-describing run folders: run.json (config, git commit, versions, device), the metrics log, device choice.

A run folder looks like

    run_dir/
      run.json          resolved config + provenance; a "resumes" list grows on each --resume
      metrics.jsonl     one JSON object per line: {"step": int, "time": unix seconds, <scalars>}
      samples/          grids written during training (step_000200.png, ...)
      checkpoints/      model / training-state folders

Nothing we write can destroy work: `check_output` is the one output guard every writer calls before any work
(never inside a model, run or cache folder but as that folder's entry for the command, never over a file the
command did not write, never where nothing can be written); `check_output_not_inside` (a training's run
folder) and `check_image_output` (pictures) are its callers here. A run folder is ours only when it is
missing, empty, or already one of our runs of the same stage (`claim_run_folder`); `RunLock` keeps a second
training out of a folder in use. `MetricsLogger` keeps one row a step when steps are run again.
Nothing here imports transformers or pyarrow: their versions come from package metadata.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from parti.checkpoint import (
    CACHE_DIR,
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    MANIFEST_NAME,
    METRICS_NAME,
    MODEL_KINDS,
    RUN_JSON,
    SAMPLES_DIR,
)
from parti.device import choose_mixed_precision, detect_device
from parti.errors import PartiError
from parti.files import atomic_write, check_writable, read_json, write_json

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "transformers", "accelerate", "pyarrow", "numpy", "parti")
RUN_KIND = "parti_run"  # run.json's marker: a folder whose run.json lacks it is not ours to write
LOCK_NAME = ".parti.lock"
# The lock is a lease: its holder touches it every HEARTBEAT_S while it trains. One not touched for LEASE_S is
# stale on any host: a Colab runtime that disconnected (a new machine, a new hostname) cannot hold it forever.
HEARTBEAT_S = 30.0
LEASE_S = 180.0
# What may sit in a run folder before its run.json exists: the code cache a generator run encodes first
# and our own hidden files (the lock, an export's staging folder).
PRE_RUN_ENTRIES = (CACHE_DIR,)
CACHE_ENTRIES = (MANIFEST_NAME, "train", "val")
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


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
        claim_run_folder(self.path, stage=config.get("stage"))
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
            data = {"kind": RUN_KIND, "config": config, "started": entry.pop("time"), **entry, "resumes": []}
        data["kind"] = RUN_KIND  # a run from before the marker existed gets it on resume
        for sub in (SAMPLES_DIR, CHECKPOINTS_DIR):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        write_json(run_json, data)
        self.info = data  # the run.json content
        self.config = data["config"]  # resolved config the run was created with (the old one on resume)
        self.mixed_precision = precision

    def record_progress(self, step: int, steps: int) -> None:
        """run.json's "progress": the step reached of the steps asked, and whether the run finished (reached its
        last step). Stage 2 reads it to refuse a tokenizer whose training stopped early (`run_progress`)."""
        self.info["progress"] = {"step": step, "steps": steps, "finished": step >= steps, "time": _now()}
        write_json(self.path / RUN_JSON, self.info)

    def record_best(self, best: dict[str, Any] | None) -> None:
        """run.json's "best": the evaluation whose weights the export holds ({"step", "metric", "value"}), or
        None while no evaluation has run (the export then holds the newest weights)."""
        self.info["best"] = best
        write_json(self.path / RUN_JSON, self.info)

    def record_warning(self, warning: dict[str, Any]) -> None:
        """Append to run.json's "warnings" (`parti.health.HealthWarning.record()`), with the time."""
        self.info["warnings"] = [*self.info.get("warnings", []), {**warning, "time": _now()}]
        write_json(self.path / RUN_JSON, self.info)

    def warned(self) -> set[str]:
        """The kinds of health warning this run gave already (before a resume too): each is given once."""
        return {w.get("kind") for w in self.info.get("warnings", []) if isinstance(w, dict)}

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

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


def run_progress(folder: str | Path) -> dict[str, Any] | None:
    """A run folder's progress ({"step", "steps", "finished"}) from its run.json, or None when the folder holds
    no run record (a model copied or downloaded alone) or one from before progress was recorded."""
    record = _read_run_json(Path(folder))
    progress = (record or {}).get("progress")
    if not isinstance(progress, dict) or not isinstance(progress.get("finished"), bool):
        return None
    return progress


def is_parti_run(folder: str | Path) -> bool:
    """`folder` holds a run.json written by RunFolder (with the marker, or an older one with its fields)."""
    data = _read_run_json(Path(folder))
    return data is not None


def _read_run_json(folder: Path) -> dict[str, Any] | None:
    """run.json when it is ours, else None (missing, unreadable, or another tool's run.json)."""
    path = folder / RUN_JSON
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except PartiError:
        return None
    legacy = isinstance(data.get("config"), dict) and "started" in data and "versions" in data
    return data if data.get("kind") == RUN_KIND or legacy else None


def claim_run_folder(path: str | Path, *, stage: str | None) -> Path:
    """Refuse, before anything is written, a --out that is not ours: a file, a folder of other files, a
    run.json parti did not write, or a run of the other stage. Ours: missing, empty, holding only what a
    run writes before its run.json (a code cache, our hidden files), or one of our runs of `stage`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PartiError(f"--out {path} is a file; give a folder for the run")
    if not path.is_dir():
        return path
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as e:
        raise PartiError(f"--out {path} cannot be read ({e.strerror or e}); choose another --out") from None
    if RUN_JSON in entries:
        data = _read_run_json(path)
        if data is None:
            raise PartiError(f"--out {path} holds a {RUN_JSON} that parti did not write; choose another --out "
                             f"(parti never writes into a folder of other files)")
        found = data.get("config", {}).get("stage")
        if stage is not None and found not in (None, stage):
            raise PartiError(f"{path} holds a {found} run, not a {stage} run; choose another --out")
        return path
    foreign = [n for n in entries if not n.startswith(".") and not (n in PRE_RUN_ENTRIES and _is_cache_dir(path / n))]
    if foreign:
        raise PartiError(f"--out {path} holds files that are not a parti run ({foreign[:5]}); choose an empty or "
                         f"new folder (parti never writes into a folder of other files)")
    return path


def _is_cache_dir(folder: Path) -> bool:
    return folder.is_dir() and all(p.name in CACHE_ENTRIES or p.name.startswith(".") for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# One training per run folder


class RunLock:
    """An exclusive lock on a run folder: `with RunLock(run_dir): train...`.

    The lock file (run_dir/.parti.lock) is created with O_EXCL and names the pid, host, boot and start
    time. It is a lease: while held, a daemon thread touches it every HEARTBEAT_S. A live holder is a one-line
    PartiError naming it; a lock is taken over, with a log line, when its process is gone (this host), it
    predates this boot, or it went LEASE_S without a heartbeat (any host: a dead Colab runtime's lock on
    Drive). Take-overs are serialised by a second O_EXCL file, so two starters never both remove a stale lock
    and both proceed.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False
        self._mine: dict[str, Any] = {}
        self._stop_beating = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PartiError(f"could not create {self.folder}: {e.strerror or e}; choose another --out") from None
        self._mine = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(), "started": _now(),
                      "argv": list(sys.argv)}
        for _ in range(5):
            if self._create():
                self.held = True
                self._start_heartbeat()
                return self
            holder = _read_lock(self.path)
            if holder is not None and not _lock_is_stale(holder, age=_age(self.path)):
                raise PartiError(f"{self.folder} is in use by another training (pid {holder.get('pid')} on "
                                 f"{holder.get('host')}, since {holder.get('started')}, alive {_age(self.path):.0f} s "
                                 f"ago); wait for it or stop it. A training that died elsewhere (a runtime that "
                                 f"disconnected) releases it {LEASE_S / 60:.0f} min after its last sign of life: "
                                 f"then start again")
            if holder is None and _age(self.path) < 30:
                continue  # being written by a starter right now (O_EXCL create, then write): look again
            self._take_over(holder)
        raise PartiError(f"could not lock {self.folder}: another process keeps taking {self.path}; try again")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise PartiError(f"could not write {self.path}: {e.strerror or e}; choose another --out") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._mine) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, stale: dict[str, Any] | None) -> None:
        """Remove the stale lock `stale` (None: unreadable and old) unless someone else already did."""
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        if guard.exists() and _age(guard) > 60:  # a take-over killed half-way
            guard.unlink(missing_ok=True)
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            time.sleep(0.05)
            return
        try:
            if _read_lock(self.path) == stale:  # still the stale one, not a lock taken since
                log.warning("taking over the stale lock %s left by pid %s on %s (last sign of life %.0f s ago)",
                            self.path, (stale or {}).get("pid"), (stale or {}).get("host"), _age(self.path))
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop_beating.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="parti-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        """Touch the lock while it is ours; a lock someone took over (we were thought dead) is left alone."""
        while not self._stop_beating.wait(HEARTBEAT_S):
            if _read_lock(self.path) != self._mine:
                log.warning("%s is no longer this training's lock (taken over); it is not refreshed", self.path)
                return
            try:
                os.utime(self.path)
            except OSError as e:  # a flaky network mount: try again at the next beat
                log.warning("could not refresh %s: %s", self.path, e.strerror or e)

    def release(self) -> None:
        self._stop_beating.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        if self.held and _read_lock(self.path) == self._mine:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _lock_is_stale(holder: dict[str, Any], *, age: float) -> bool:
    """A lock not refreshed for LEASE_S (`age`: seconds since its last heartbeat) is stale on any host; one of
    this host also when its pid is gone, or it predates this boot."""
    if age > LEASE_S:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot") is not None and _boot_id() is not None and holder["boot"] != _boot_id():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


# ---------------------------------------------------------------------------------------------------------------
# Outputs that must not overwrite a model


def _model_kind(folder: Path) -> str | None:
    """The model kind of folder/config.json when it is a parti model's, else None."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        kind = read_json(path).get("kind")
    except PartiError:
        return None
    return kind if kind in MODEL_KINDS else None


def _protected(folder: Path) -> str | None:
    """What `folder` is when writing into it could destroy work: "tokenizer folder" (any parti model's
    kind), "run folder" (our run.json) or "code cache" (a cache manifest); None for any other folder."""
    kind = _model_kind(folder)
    if kind is not None:
        return f"{kind} folder"
    if is_parti_run(folder):
        return "run folder"
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            return "code cache" if read_json(manifest).get("kind") == "code_cache" else None
        except PartiError:
            return None
    return None


def check_output(out: str | Path, *, what: str = "--out", folder: bool = False, slots: tuple[str, ...] = (),
                 reads: tuple[str | Path | None, ...] = (), may_be: str | None = None,
                 replaces: Callable[[Path], str | None] | None = None) -> Path:
    """The one output guard: every writer calls it on its output before any work. Refused, with one line:

    - an existing `out` of the wrong type (`folder`: a file where a folder is written, or the other way round);
    - `out` equal to or inside a folder this command `reads` (the --tokenizer a training reads);
    - `out` equal to or inside a model folder, a run folder or a code cache, unless it is one of that folder's
      `slots` (this command's own entries there: eval.json, plots/, samples/, cache/) or, `may_be` "run" or
      "cache", that folder itself (a training's own run, an encode's own cache);
    - an existing `out` that `replaces(path)` does not accept as this command's own output (it returns why
      not, e.g. "is not an image"); without `replaces` no existing file is written over;
    - an `out` that cannot be written: under a file, on a read-only disk, in /proc (probed now).
    Returns `out`, with ~ expanded."""
    try:
        return _check_output(Path(out), what=what, folder=folder, slots=slots, reads=reads, may_be=may_be,
                             replaces=replaces)
    except OSError as e:  # a name too long to be a path, a loop of symlinks, an I/O error
        raise PartiError(f"{what} {_shown(out)} cannot be used: {e.strerror or e}; choose another {what}") from None


def _shown(path: str | Path) -> str:
    """A path for a message: a very long one is cut, so the error stays one readable line."""
    text = str(path)
    return text if len(text) <= 200 else f"{text[:100]}... ({len(text):,} characters)"


def _check_output(out: Path, *, what: str, folder: bool, slots: tuple[str, ...], reads: tuple, may_be: str | None,
                  replaces: Callable[[Path], str | None] | None) -> Path:
    """`check_output`, which turns the OSErrors a hostile path raises into one line."""
    target = out.expanduser()
    if folder and target.exists() and not target.is_dir():
        raise PartiError(f"{what} {out} is a file; give a folder")
    if not folder and target.is_dir():
        raise PartiError(f"{what} {out} is a folder; give a file name")
    resolved = target.resolve()
    for p in reads:
        guarded = Path(p).expanduser().resolve() if p is not None else None
        if guarded is not None and (resolved == guarded or guarded in resolved.parents):
            raise PartiError(f"{what} {out} is {'' if resolved == guarded else 'inside '}{p}, which this command "
                             f"reads; writing there would overwrite it: choose another {what}")
    for parent in (resolved, *resolved.parents):
        desc = _protected(parent)
        if desc is None or (parent != resolved and resolved.relative_to(parent).parts[0] in slots):
            continue
        if parent == resolved and (may_be == "run" and is_parti_run(parent) or may_be == "cache" and
                                   desc == "code cache"):
            continue
        where = "the" if parent == resolved else "inside the"
        own = f" (inside it, only {', '.join(slots)} {'is' if len(slots) == 1 else 'are'} this command's)" if slots else ""
        raise PartiError(f"{what} {out} is {where} {desc} {parent}; writing there would overwrite work others "
                         f"depend on: choose another {what}{own}")
    if target.exists():
        reason = "is not an output of this command" if replaces is None else replaces(target)
        if reason is not None:
            raise PartiError(f"{what} {out} exists and {reason}; parti writes over nothing it did not write: "
                             f"choose another {what}, or move that away")
    check_writable(target, what=what)
    return target


def check_output_not_inside(out: str | Path, *protected: str | Path | None, what: str = "--out") -> None:
    """A training's run folder: `check_output` refuses `out` when it equals or lies inside one of
    `protected` (the --tokenizer folder a run reads, say), or a model, run or cache folder that is not this
    run (`train-tokenizer --out GEN/tokenizer`); whether an existing folder is this run's is
    `claim_run_folder`'s check."""
    check_output(out, what=what, folder=True, reads=protected, may_be="run", replaces=lambda path: None)


def check_image_output(path: str | Path) -> str:
    """The PIL format for an image output `path` (.png, .jpg/.jpeg, .webp), or a one-line PartiError when
    writing it could destroy something: a folder, an existing file that is not an image, a path in a
    checkpoint folder (next to its config.json, or in its tokenizer/, text_encoder/ or checkpoints/)."""
    try:
        return _check_image_output(Path(path))
    except OSError as e:  # a name too long to be a path, a loop of symlinks, an I/O error
        raise PartiError(f"--out {_shown(path)} cannot be used: {e.strerror or e}; choose another --out") from None


def _check_image_output(path: Path) -> str:
    p = path.expanduser()
    fmt = IMAGE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise PartiError(f"--out {path} must end in {', '.join(IMAGE_FORMATS)}; the suffix picks the image format")
    if p.is_dir():
        raise PartiError(f"--out {path} is a folder; give an image file name")
    parent = p.resolve().parent
    for folder in (parent, *parent.parents):
        inner = parent.relative_to(folder).parts if folder != parent else ()
        if _model_kind(folder) is not None and (folder == parent or inner[0] in ("tokenizer", "text_encoder",
                                                                                  CHECKPOINTS_DIR)):
            raise PartiError(f"--out {path} is inside the checkpoint folder {folder}; write images elsewhere "
                             f"(its {SAMPLES_DIR}/ folder is fine)")
    if p.exists() and not _is_image(p):
        raise PartiError(f"--out {path} exists and is not an image; parti only replaces image files")
    if p.exists() and not _written_by_parti(p):
        raise PartiError(f"--out {path} is an image parti did not write; parti replaces only its own pictures: "
                         f"choose another --out, or move that one away first")
    check_output(p, slots=(SAMPLES_DIR,), replaces=lambda found: None)  # run folders, caches; writable now
    return fmt


IMAGE_MARK = "parti"  # EXIF Software (0x0131) of every picture `save_image` writes: what it may replace later
EXIF_SOFTWARE = 0x0131


def _written_by_parti(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.getexif().get(EXIF_SOFTWARE) == IMAGE_MARK
    except Exception:  # noqa: BLE001 - an unreadable image is not ours either
        return False


def _is_image(path: Path) -> bool:
    from PIL import Image

    if not path.is_file():  # a FIFO named x.png would hang the reader
        return False
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types for non-images
        return False


def save_image(image: Any, path: str | Path) -> Path:
    """Write PIL `image` atomically in the format `path`'s suffix names (checked by check_image_output), marked
    as ours (EXIF Software "parti") so that a later run may replace it and no one else's picture."""
    from PIL import Image

    fmt = check_image_output(path)
    if fmt == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")  # JPEG holds no alpha
    exif = Image.Exif()
    exif[EXIF_SOFTWARE] = IMAGE_MARK
    atomic_write(Path(path).expanduser(), lambda tmp: image.save(tmp, format=fmt, exif=exif))
    return Path(path)


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
    a killed run, so new lines never glue onto it. The first step logged after opening drops the rows an
    earlier run logged for that step and later ones: those steps are being run again (a resume from an
    earlier checkpoint, or from none), and each step keeps one history. Only the main process of a
    multi-GPU run should log.
    """

    def __init__(self, path: str | Path, *, fsync_every: float = 5.0):
        self.path = Path(path)
        self.fsync_every = fsync_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._last_sync = time.monotonic()
        self._rewound = self.path.stat().st_size == 0  # nothing an earlier run logged to drop

    def log(self, step: int, **scalars: Any) -> dict[str, Any]:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        if "time" in scalars:
            raise ValueError("'time' is written by MetricsLogger; use another name")
        record = {"step": step, **{k: _plain(k, v) for k, v in scalars.items()}, "time": round(time.time(), 3)}
        if not self._rewound:
            self._rewound = True
            dropped = self.truncate_after(step - 1)
            if dropped:
                log.warning("%s: dropped %d rows of step %d and later, logged by an earlier run of those steps "
                            "(they are run again now)", self.path, dropped, step)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if time.monotonic() - self._last_sync >= self.fsync_every:
            os.fsync(self._file.fileno())
            self._last_sync = time.monotonic()
        return record

    def truncate_after(self, step: int) -> int:
        """Drop lines with "step" > `step` (a resumed run re-logs them); return how many were dropped."""
        self._rewound = True  # the resumed run's rows follow on from here
        self._file.flush()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        if len(kept) == len(lines):
            return 0
        self._file.close()
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))
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
