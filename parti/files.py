"""Safe file writes and bounded JSON reads, used by every module that writes a file.

`atomic_write(path, write)` writes through a temporary file in the same folder, fsyncs it and renames it
over `path`, so a kill leaves the old file or the new one, never a mix. `read_json` refuses anything but a
JSON object with a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from parti.errors import PartiError


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync, rename over `path`, fsync the folder.

    A kill at any moment leaves either the old file or the new one, never a mix; a full disk (or any
    write error) is a PartiError and the old file stays as it was.
    """
    tmp = None
    umask = os.umask(0)
    os.umask(umask)
    try:
        # Inside the try: a read-only --out, one under a file or under /proc is the same one-line error.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power cut
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors as SafetensorError
        _unlink_quietly(tmp)
        lines = str(e).strip().splitlines()
        reason = getattr(e, "strerror", None) or (lines[0] if lines else "") or type(e).__name__
        raise PartiError(f"could not write {path}: {reason}; free disk space or choose another --out") from e
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PartiError(f"{path} not found") from None
    except OSError as e:  # unreadable (permissions), a folder, an I/O error
        raise PartiError(f"could not read {path}: {e.strerror or e}; check the file and its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PartiError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise PartiError(f"{path} must hold a JSON object")
    return data
