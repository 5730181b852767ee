"""Self-describing checkpoint folders: `config.json` + `model.safetensors`, written atomically.

Nothing here unpickles. A folder is loaded from itself alone: the config names the model kind
("tokenizer", "generator", ...) and its dataclass fields; weights load strictly.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from parti.errors import PartiError

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
# First bytes of pickle streams (protocol 2+) and of torch.save's zip archives: named in the error only.
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")

T = TypeVar("T")


def parti_home() -> Path:
    """Where downloaded third-party weights are cached: `$PARTI_HOME`, default `~/.cache/parti`."""
    home = os.environ.get("PARTI_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "parti"


def config_from_dict(cls: type[T], data: dict[str, Any], *, what: str) -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrong types are errors, never ignored."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PartiError(f"{what}: unknown config keys {unknown}; known keys are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls, name, None) if fields[name].default is not dataclasses.MISSING else None
        if default is not None and isinstance(default, (int, float, bool, str)):
            ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, bool):
                ok = False
            if not ok:
                raise PartiError(f"{what}: config key {name!r} must be {type(default).__name__}, got {value!r}")
            if isinstance(default, float):
                value = float(value)
        if isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync, rename over `path`, fsync the folder.

    A kill at any moment leaves either the old file or the new one, never a mix; a full disk (or any
    write error) is a PartiError and the old file stays as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors as SafetensorError
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0] or type(e).__name__
        raise PartiError(f"could not write {path}: {reason}; free disk space or choose another --out") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
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
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PartiError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PartiError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise PartiError(f"{path} must hold a JSON object")
    return data


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage: give it private contiguous copies.
    flat = {k: v.detach().contiguous().clone() if v.data_ptr() in _shared_ptrs(tensors) else v.detach().contiguous()
            for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(flat, tmp, metadata=metadata)
        _check_length(Path(tmp))  # a short write (full disk) must never be renamed into place

    _atomic_write(Path(path), write)


def _check_length(path: Path) -> None:
    """The file is as long as its header says: 8 + header + the last tensor's end offset."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise OSError(errno.EIO, "short write (unreadable header)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise OSError(errno.ENOSPC, f"short write ({size} of {8 + n + end} bytes)")


def _shared_ptrs(tensors: dict[str, torch.Tensor]) -> set[int]:
    seen, shared = set(), set()
    for v in tensors.values():
        p = v.data_ptr()
        (shared if p in seen else seen).add(p)
    return shared


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a torch.save archive, a truncated file) is refused
    with a PartiError. Nothing is ever unpickled: safetensors holds raw tensors and a JSON header."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise PartiError(f"{path} is a pickle-based file; parti only reads safetensors (never unpickles)")
    if not path.exists():
        raise PartiError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        if _looks_pickled(path):
            raise PartiError(f"{path} holds a pickle (torch.save) payload, not safetensors; it was refused "
                             f"unread (parti never unpickles): replace it with a file parti saved") from None
        raise PartiError(f"{path} is not a readable safetensors file ({e}); it is corrupt or truncated") from None


def _looks_pickled(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4).startswith(PICKLE_MAGIC)
    except OSError:
        return False


def _weights_metadata(folder: Path) -> dict[str, str] | None:
    """The string metadata of folder/model.safetensors (header only), or None when unreadable."""
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # missing, truncated, a pickle: load_state reports it with the right message
        return None


def check_folder(folder: str | Path, kind: str) -> dict[str, Any]:
    """Read and validate `folder/config.json` for a model of `kind`; return the config dict."""
    folder = Path(folder)
    if folder.is_file():
        hint = " (pickle files are never loaded)" if folder.suffix in PICKLE_SUFFIXES else ""
        raise PartiError(f"{folder} is a file; give the checkpoint folder holding {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    if not folder.is_dir():
        raise PartiError(f"checkpoint folder {folder} does not exist")
    if not (folder / CONFIG_NAME).exists():
        have = sorted(p.name for p in folder.iterdir())[:10]
        raise PartiError(f"{folder} has no {CONFIG_NAME} (it holds {have}); is this a parti checkpoint folder?")
    config = read_json(folder / CONFIG_NAME)
    # model.safetensors carries a copy of config.json and is renamed into place first: when a save was
    # killed between the two renames, the weights' copy is the newer one and describes them exactly.
    meta = _weights_metadata(folder)
    if meta and "config" in meta and meta.get("fingerprint") != config.get("fingerprint"):
        try:
            embedded = json.loads(meta["config"])
        except ValueError:
            embedded = None
        if isinstance(embedded, dict) and embedded.get("fingerprint") == meta.get("fingerprint"):
            log.warning("%s: config.json is older than model.safetensors (a save was interrupted); "
                        "using the config stored inside model.safetensors", folder)
            config = embedded
    found = config.get("kind")
    if found != kind:
        raise PartiError(f"{folder} holds a {found or 'unknown'} checkpoint, not a {kind}; pass a {kind} folder")
    return config


def save_model(folder: str | Path, kind: str, config: Any, model: torch.nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Save `model` as folder/{config.json, model.safetensors}. Weights first, config last, both atomic.

    The weights also carry config.json's content in their metadata, so the renamed weights file alone is
    the commit point: a kill between the two renames leaves a folder `check_folder` still reads exactly.
    """
    folder = Path(folder)
    state = model.state_dict()
    data = {"kind": kind, "config": dataclasses.asdict(config), **(extra or {})}
    data["fingerprint"] = fingerprint_state(state)
    text = json.dumps(data, sort_keys=True)
    write_tensors(folder / WEIGHTS_NAME, state, metadata={"kind": kind, "fingerprint": data["fingerprint"],
                                                          "config": text})
    write_json(folder / CONFIG_NAME, json.loads(text))
    return folder


def load_state(folder: str | Path, model: torch.nn.Module) -> None:
    """Load folder/model.safetensors into `model` strictly; mismatches are a clear error."""
    path = Path(folder) / WEIGHTS_NAME
    state = read_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise PartiError(f"{path} does not match its config.json ({first}); the folder is inconsistent") from None


def fingerprint_state(state: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict: identifies the exact weights a cache or generator used."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
