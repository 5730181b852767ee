"""Safe file writes and bounded JSON reads, used by every module that writes a file.

`atomic_write(path, write)` writes through a temporary file in the same folder, fsyncs it and renames it
over `path`, so a kill leaves the old file or the new one, never a mix. `read_json` refuses anything but a
JSON object with a one-line error. Every reader opens only regular files under a size bound (`regular_file`):
a FIFO would hang it and `/dev/zero` would never end. `check_writable` finds, before any work, an output
that could not be written (under a file, on a read-only disk, in /proc); `parti.runs.check_output` is the
output guard every writer calls, built on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
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


MAX_JSON_BYTES = 64 << 20  # config.json, run.json, manifests, results: kilobytes each; far above any we write


def regular_file(path: str | Path, *, limit: int, what: str = "file") -> int:
    """The size of `path` (symlinks followed) when it is a regular file of at most `limit` bytes, else a
    one-line PartiError: missing, unreadable (permissions said as such, not as missing), a folder, a FIFO or
    device (a reader would hang, or never reach the end), or larger than `limit` (`what` names the file)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise PartiError(f"{path} not found") from None
    except PermissionError:
        raise PartiError(f"could not read {path}: permission denied; check the file and its folders' "
                         f"permissions") from None
    except OSError as e:  # a symlink loop, a name too long, an I/O error
        raise PartiError(f"could not read {path}: {e.strerror or e}; check the file") from None
    if stat.S_ISDIR(st.st_mode):
        raise PartiError(f"could not read {path}: it is a folder, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise PartiError(f"could not read {path}: it is not a regular file (a pipe, device or socket, perhaps "
                         f"through a symlink); replace it with the {what} itself")
    if st.st_size > limit:
        raise PartiError(f"{path} holds {st.st_size:,} bytes, more than a {what} may ({limit:,}); it is not "
                         f"one parti wrote: replace it")
    return st.st_size


def not_plain_file(path: str | Path, *, limit: int) -> str | None:
    """None when `path` is a regular file of its own (not a symlink: one in a run folder may point at a key or
    a token) of at most `limit` bytes, else why not, for a log line. Copiers of pictures we publish or show
    (`parti push`'s sample grid, `parti plot`'s latest grids) copy only such files."""
    try:
        info = os.lstat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISLNK(info.st_mode):
        return "a symlink"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return f"larger than {limit:,} bytes" if info.st_size > limit else None


def read_bytes(path: str | Path, *, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (`regular_file`); one that grew past the bound
    since it was checked is refused too."""
    regular_file(path, limit=limit, what=what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except PermissionError:
        raise PartiError(f"could not read {path}: permission denied; check the file's permissions") from None
    except OSError as e:
        raise PartiError(f"could not read {path}: {e.strerror or e}; check the file and its permissions") from None
    if len(data) > limit:
        raise PartiError(f"{path} grew past {limit:,} bytes while it was read; it is not a {what} parti wrote")
    return data


def check_writable(path: str | Path, *, what: str = "--out") -> Path:
    """Refuse now, not after the work, an output `path` that cannot be written: a path under a file, or one
    whose nearest existing folder takes no new file (read-only, /proc, permissions; probed with an unnamed
    temporary file, so nothing is left behind). Returns the path, with ~ expanded."""
    path = Path(path).expanduser()
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise PartiError(f"{what} {path} lies under {existing}, which is a file, not a folder; choose another {what}")
    folder = existing if existing.is_dir() else existing.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PartiError(f"{what} {path} cannot be written: {folder} takes no new file ({e.strerror or e}); "
                         f"choose another {what}") from None
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(read_bytes(path, limit=MAX_JSON_BYTES, what="JSON file"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PartiError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise PartiError(f"{path} must hold a JSON object")
    return data
