"""Self-describing checkpoint folders: `config.json` + `model.safetensors`, written atomically.

Nothing here unpickles. A folder is loaded from itself alone: the config names the model kind
("tokenizer", "generator", ...) and its dataclass fields; weights load strictly. Nothing read is trusted:
`config_from_dict` bounds every model field (parti.validate) and `load_model_weights` compares the
weights' header with the shapes the config implies before reading a tensor, then refuses non-finite
weights and weights that are not the ones the config's fingerprint names. `atomic_export` makes a
whole export (generator + tokenizer/ + text_encoder/) appear complete or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from parti.errors import PartiError
from parti.files import atomic_write, fsync_dir, read_json, regular_file, write_json
from parti.validate import MAX_PARAM_BYTES, check_model_config

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"  # a generator folder's copy of its image tokenizer
TEXT_ENCODER_DIR = "text_encoder"  # a generator folder's trained text encoder (absent with a frozen T5)
SPM_NAME = "spm.model"  # a trained text encoder's SentencePiece model
# Every file a generator (or tokenizer) folder loads from; the Hub download's allow-list and the upload's content.
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, f"{TOKENIZER_DIR}/{CONFIG_NAME}", f"{TOKENIZER_DIR}/{WEIGHTS_NAME}",
               f"{TEXT_ENCODER_DIR}/{CONFIG_NAME}", f"{TEXT_ENCODER_DIR}/{WEIGHTS_NAME}", f"{TEXT_ENCODER_DIR}/{SPM_NAME}")
# A run folder is the model (the files above) and the record of its training run:
RUN_JSON = "run.json"  # the resolved config, versions, device, and whether the run finished
METRICS_NAME = "metrics.jsonl"  # one JSON object a logged step
SAMPLES_DIR = "samples"  # sample grids, one a sampling step: GRID_GLOB, named by `grid_name`
GRID_GLOB = "step_*.png"  # zero-padded step numbers: name order is step order
CHECKPOINTS_DIR = "checkpoints"  # resumable training state, one step_* folder each
CACHE_DIR = "cache"  # a generator run's code cache (parti.cache), encoded before training
MANIFEST_NAME = "manifest.json"  # a code cache's description, written last
EVAL_NAME = "eval.json"  # `parti evaluate`'s results, by default
EVAL_TOKENIZER_NAME = "eval_tokenizer.json"  # `parti evaluate-tokenizer`'s results, by default
DEMO_NAME = "demo.json"  # `parti demo`'s summary, in the demo's output folder
MAX_GRID_BYTES = 64 << 20  # a sample grid is a few MB; anything larger in samples/ is not one
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
# First bytes of pickle streams (protocol 2+) and of torch.save's zip archives: named in the error only.
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
# The largest tensor file read: a training state holds the weights, two AdamW moments and an EMA copy of a
# model of at most MAX_PARAM_BYTES. Only regular files are opened (a FIFO would hang the reader).
MAX_TENSOR_FILE_BYTES = 4 * MAX_PARAM_BYTES + 2**30

MODEL_KINDS = ("tokenizer", "generator", "text_encoder")
# Top-level keys of config.json beyond kind/config/fingerprint, per kind: any other key is an edit or
# another tool's file. A new key the trainers record must be added here (saving refuses unknown ones).
EXTRA_KEYS = {"tokenizer": ("best",), "text_encoder": ("tokenizer_fingerprint",),
              "generator": ("tokenizer_fingerprint", "text_encoder", "text_encoder_source", "data", "best")}
# safetensors header dtype names of the torch dtypes our models hold.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
EXPORT_STAGING, EXPORT_READY = ".export.staging", ".export.ready"  # atomic_export's folders inside the target
EXPORT_OLD = ".export.old"
RESUME_HINT = "if a training run was stopped while exporting, run it again with --resume to rewrite the export"

T = TypeVar("T")


def grid_name(step: int) -> str:
    """The sample grid of training step `step`, in SAMPLES_DIR (matches GRID_GLOB)."""
    return f"step_{step:07d}.png"


def parti_home() -> Path:
    """Where downloaded third-party weights are cached: `$PARTI_HOME`, default `~/.cache/parti`."""
    home = os.environ.get("PARTI_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "parti"


def config_from_dict(cls: type[T], data: dict[str, Any], *, what: str) -> T:
    """Build dataclass `cls` from `data`; unknown keys, wrong types and non-finite numbers are errors, never
    ignored. Model configs are also bounded field by field and by size (parti.validate)."""
    if not isinstance(data, dict):
        raise PartiError(f"{what}: the config must be a JSON object, got {type(data).__name__} {data!r:.40}")
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
        if isinstance(value, float) and not math.isfinite(value):  # JSON parsers accept NaN and Infinity
            raise PartiError(f"{what}: config key {name!r} must be finite, got {value!r}")
        if isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    check_model_config(cls, kwargs, what=what)
    return cls(**kwargs)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage: give it private contiguous copies.
    flat = {k: v.detach().contiguous().clone() if v.data_ptr() in _shared_ptrs(tensors) else v.detach().contiguous()
            for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(flat, tmp, metadata=metadata)
        _check_length(Path(tmp))  # a short write (full disk) must never be renamed into place

    atomic_write(Path(path), write)


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
    regular_file(path, limit=MAX_TENSOR_FILE_BYTES, what="weights file")  # missing, a FIFO, /dev/zero: one line
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
        regular_file(folder / WEIGHTS_NAME, limit=MAX_TENSOR_FILE_BYTES)  # never open a FIFO: it would hang
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # missing, truncated, a pickle: the loader reports it with the right message
        return None


def check_folder(folder: str | Path, kind: str) -> dict[str, Any]:
    """Read and validate `folder/config.json` for a model of `kind`; return the config dict.

    Refused with one line: a missing folder or config, another kind, top-level keys parti does not write,
    a "config" that is not an object, and an export that a kill interrupted (it says to --resume).
    """
    folder = Path(folder)
    try:
        os.listdir(folder)  # a folder we may not read is said as such, not as a missing one
    except (FileNotFoundError, NotADirectoryError):
        pass  # missing, or a file: said below
    except OSError as e:  # permissions, a name too long to be a path, an I/O error
        shown = str(folder) if len(str(folder)) <= 200 else f"{str(folder)[:100]}... ({len(str(folder)):,} characters)"
        raise PartiError(f"could not read checkpoint folder {shown}: {e.strerror or e}; check the path and its "
                         f"permissions") from None
    if folder.is_file():
        hint = " (pickle files are never loaded)" if folder.suffix in PICKLE_SUFFIXES else ""
        raise PartiError(f"{folder} is a file; give the checkpoint folder holding {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    _refuse_torn_export(folder)
    if not folder.is_dir():
        hint = f"; {RESUME_HINT}" if _inside_export(folder) else ""
        raise PartiError(f"checkpoint folder {folder} does not exist{hint}")
    if not (folder / CONFIG_NAME).exists():
        have = sorted(p.name for p in folder.iterdir())[:10]
        hint = f"; {RESUME_HINT}" if (folder / RUN_JSON).exists() else ""
        raise PartiError(f"{folder} has no {CONFIG_NAME} (it holds {have}); is this a parti checkpoint folder?{hint}")
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
        found = found if isinstance(found, str) and found in MODEL_KINDS else "unknown"
        raise PartiError(f"{folder} holds a {found} checkpoint, not a {kind}; pass a {kind} folder")
    unknown = sorted(set(config) - {"kind", "config", "fingerprint", *EXTRA_KEYS[kind]})
    if unknown:
        raise PartiError(f"{folder}/{CONFIG_NAME}: unknown top-level keys {unknown}; the file was edited or is "
                         f"not parti's (re-save the model)")
    if not isinstance(config.get("config"), dict):
        raise PartiError(f"{folder}/{CONFIG_NAME}: 'config' must be an object of model settings, got "
                         f"{config.get('config')!r:.40}; the file is corrupt or not parti's")
    if not isinstance(config.get("fingerprint", ""), str):
        raise PartiError(f"{folder}/{CONFIG_NAME}: 'fingerprint' must be a string; the file is corrupt")
    return config


def save_model(folder: str | Path, kind: str, config: Any, model: torch.nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Save `model` as folder/{config.json, model.safetensors}. Weights first, config last, both atomic.

    The weights also carry config.json's content in their metadata, so the renamed weights file alone is
    the commit point: a kill between the two renames leaves a folder `check_folder` still reads exactly.
    """
    folder = Path(folder)
    unknown = sorted(set(extra or {}) - set(EXTRA_KEYS[kind]))
    if unknown:  # a programming error: loading would refuse the folder
        raise ValueError(f"save_model: keys {unknown} are not in checkpoint.EXTRA_KEYS[{kind!r}]; add them there")
    state = model.state_dict()
    data = {"kind": kind, "config": dataclasses.asdict(config), **(extra or {})}
    data["fingerprint"] = fingerprint_state(state)
    text = json.dumps(data, sort_keys=True)
    write_tensors(folder / WEIGHTS_NAME, state, metadata={"kind": kind, "fingerprint": data["fingerprint"],
                                                          "config": text})
    write_json(folder / CONFIG_NAME, json.loads(text))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Loading weights that were checked before anything is allocated


def load_model_weights(folder: str | Path, build: Callable[[], torch.nn.Module], *, fingerprint: str | None,
                       max_bytes: int | None = None) -> torch.nn.Module:
    """Build the model with `build()` and load folder/model.safetensors into it, strictly, on CPU.

    Before any real allocation the model is built on the `meta` device: its parameter bytes are bounded
    (`max_bytes`, default parti.validate.MAX_PARAM_BYTES) and the file's header (names, shapes, dtypes) must
    equal the state dict's. Then the tensors are read, must be finite, and must hash to `fingerprint`
    (the config's; None skips that check), so weights swapped under a config are refused.
    """
    path = Path(folder) / WEIGHTS_NAME
    with torch.device("meta"):
        expected = {k: (tuple(v.shape), v.dtype) for k, v in build().state_dict().items()}
    limit = MAX_PARAM_BYTES if max_bytes is None else max_bytes
    total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected.values())
    if total > limit:
        raise PartiError(f"{path.parent}/{CONFIG_NAME} describes a model of {total / 2**30:.1f} GiB, above the "
                         f"{limit / 2**30:.0f} GiB limit; the config is corrupt or not parti's")
    _check_header(path, expected)
    state = read_tensors(path)
    _check_finite(state, path)
    if fingerprint is not None and fingerprint_state(state) != fingerprint:
        raise PartiError(f"{path} is not the weights its {CONFIG_NAME} describes (their fingerprint differs); "
                         f"the weights were replaced: restore them or re-save the model")
    model = build()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the header check makes this unreachable short of a library change
        raise PartiError(f"{path} does not match its config.json ({str(e).splitlines()[-1].strip()})") from None
    return model


def _check_header(path: Path, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """The safetensors header alone (no tensor read) must name exactly `expected`'s tensors and shapes."""
    if path.suffix in PICKLE_SUFFIXES:
        read_tensors(path)  # raises the right one-line error
    regular_file(path, limit=MAX_TENSOR_FILE_BYTES, what="weights file")  # before any open: a FIFO would hang
    if _looks_pickled(path):
        read_tensors(path)  # raises the right one-line error (a pickle)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise PartiError(f"{path} is not a readable safetensors file ({e}); it is corrupt or truncated") from None
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise PartiError(f"{path} does not match its config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); the folder is inconsistent")
    for name, (shape, dtype) in expected.items():
        found_shape, found_dtype = header[name]
        if found_shape != shape:
            raise PartiError(f"{path} does not match its config.json ({name} has shape {list(found_shape)}, the "
                             f"config implies {list(shape)}); the folder is inconsistent")
        if found_dtype != SAFETENSORS_DTYPES.get(dtype, str(dtype)):
            raise PartiError(f"{path}: {name} is stored as {found_dtype}, the model needs "
                             f"{SAFETENSORS_DTYPES.get(dtype, dtype)}; the weights were converted: re-save them")


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PartiError(f"{path}: {name} holds NaN or inf values; the weights are corrupt (a diverged run "
                             f"or a damaged file): use an earlier checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# Whole exports: complete or absent


@contextlib.contextmanager
def atomic_export(folder: str | Path) -> Iterator[Path]:
    """Write an export into the yielded staging folder; on a clean exit its entries replace `folder`'s.

        with atomic_export(run_dir) as stage:
            save_text_encoder(encoder, stage / TEXT_ENCODER_DIR)
            save_generator(generator, stage, extra=...)

    Entries of `folder` not written to the stage (run.json, checkpoints/, a tokenizer/ left as it is)
    are untouched. The staging folder is renamed to `.export.ready` once complete: that rename is the
    commit point. Each entry is then swapped in by renames (config.json last), and a kill during the swap
    is finished by the next `atomic_export` or `finish_export`; until then loaders refuse the folder with
    a one-line error that says to --resume. An error or kill before the commit leaves the old export.
    """
    folder = Path(folder)
    finish_export(folder)
    stage = folder / EXPORT_STAGING
    try:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    except OSError as e:
        raise PartiError(f"could not write {folder}: {e.strerror or e}; free disk space or choose another --out") from e
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_tree(stage)
    os.replace(stage, folder / EXPORT_READY)  # the commit point
    fsync_dir(folder)
    finish_export(folder)


def finish_export(folder: str | Path) -> None:
    """Complete an export that a kill interrupted after its commit point; drop an uncommitted stage."""
    folder = Path(folder)
    shutil.rmtree(folder / EXPORT_STAGING, ignore_errors=True)
    ready, old = folder / EXPORT_READY, folder / EXPORT_OLD
    if ready.is_dir():
        old.mkdir(exist_ok=True)
        names = sorted(p.name for p in ready.iterdir())
        for name in sorted(names, key=lambda n: n == CONFIG_NAME):  # config.json last: it names the whole
            target = folder / name
            if target.exists() or target.is_symlink():
                shutil.rmtree(old / name, ignore_errors=True)
                os.replace(target, old / name)
            os.replace(ready / name, target)
        fsync_dir(folder)
        ready.rmdir()
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def _refuse_torn_export(folder: Path) -> None:
    for candidate in (folder, folder.parent):
        if (candidate / EXPORT_READY).is_dir():
            raise PartiError(f"the export in {candidate} was interrupted and is incomplete; {RESUME_HINT}")


def _inside_export(folder: Path) -> bool:
    """`folder` is a tokenizer/ or text_encoder/ entry of an export (its parent holds a generator config)."""
    return folder.name in (TOKENIZER_DIR, TEXT_ENCODER_DIR) and (folder.parent / CONFIG_NAME).is_file()


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


# ---- third-party weights (VGG16, FID Inception): one reader, one downloader ----------------------------------

def read_weights_file(path: Path, *, flag: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or from a third-party pickle (.pth/.pt/.bin) read with
    weights_only=True, so no code runs; every failure is one line naming `flag`, the option that gives a file."""
    if not os.path.lexists(path) and os.path.isdir(path.parent):  # missing, not unreadable: say which flag
        raise PartiError(f"weights file {path} not found; give an existing file with {flag} PATH")
    regular_file(path, limit=MAX_TENSOR_FILE_BYTES, what=f"weights file ({flag})")
    if path.suffix == ".safetensors":
        return read_tensors(path)  # a corrupt or truncated file is a one-line error
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise PartiError(f"{path}: unknown weights format; give a .safetensors or .pth file with {flag} PATH")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types; all mean "not a plain state dict"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"\x1b\[[0-9;]*m", "", first)  # torch colours its message for terminals
        raise PartiError(f"{path} is not a plain weights file ({first[:120]}): it was read weights-only, so no code "
                         f"ran; give a state dict or a .safetensors file with {flag} PATH") from None
    if not isinstance(state, dict):
        raise PartiError(f"{path} holds a {type(state).__name__}, not a state dict; give one with {flag} PATH")
    return state


def download_weights(url: str, *, what: str, flag: str) -> dict[str, torch.Tensor]:
    """A published weights file, fetched once through torch.hub into a temporary folder (the caller keeps a
    safetensors copy), its sha256 prefix checked, read weights-only; a failure is one line saying what to do."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return torch.hub.load_state_dict_from_url(url, model_dir=tmp, map_location="cpu", progress=True,
                                                      check_hash=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, hash mismatch, disk full: "could not get it"
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise PartiError(f"could not download the {what} weights ({reason}); offline, pass the file "
                             f"{url.rsplit('/', 1)[-1]} with {flag} PATH") from None

