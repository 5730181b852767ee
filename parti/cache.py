"""The code cache: a frozen tokenizer (and frozen T5) run once over a dataset, stored on disk.

Stage 2 trains from here and never runs a frozen network per step (LlamaGen `extract_codes`).
Layout of a cache folder, one subfolder per split:

  manifest.json                      what made it: every input that shapes it (data, columns, synthetic length
                                     and seed, holdout, caption byte bound), tokenizer fingerprint, text
                                     encoder identity, image size, sizes
  train/codes_00000.npy              (n, T) uint16 image codes, memory-mappable
  train/captions_00000.jsonl         one caption per line (JSON strings)
  train/text_00000.npy               (tokens, D) float16 T5 states of the real tokens, row after row (ragged)
                                     [only with a frozen T5]
  train/text_len_00000.npy           (n,) int32 tokens of each row (their running sum: where a row starts)
                                     [only with a frozen T5]
  val/images_00000.npy               (n, S, S, 3) uint8 held-out images at the tokenizer's size
  val/index_00000.npy                (n,) int64 the item of the val split each row came from

Array files are written a batch at a time under a fixed-size header that gets the final row count when the
shard is finished (`_NpyStream`), so an encode's memory is bounded by its batch, not by its shard or by the
longest caption in it. The val split keeps its images and captions, so evaluation needs no dataset
(`held_out_source`).

manifest.json is written last (the old one is removed first) and lists every shard file with its size,
sha256 and mtime; `.npy` files are read with allow_pickle=False; a cache whose files, counts or shapes
differ from its manifest, or whose tokenizer or T5 differs from the run's, is refused. Reopening hashes only
files whose size or mtime moved since they were last hashed (`VERIFY`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from parti import data as data_mod
from parti.checkpoint import CACHE_DIR
from parti.device import default_device, fast_bf16
from parti.errors import PartiError
from parti.files import atomic_write, fsync_dir, read_json, write_json
from parti.runs import check_output
from parti.settings import check_settings, setting
from parti.synthetic import DEFAULT_LENGTH
from parti.text import MAX_TEXT_BYTES, clip_text
from parti.tokenizer import VQTokenizer, load_tokenizer

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# 2: shards list their files with sizes and sha256; 3: "inputs", every setting that shaped it; 4: ragged text
# states (no padding), file mtimes, the val split's images
MANIFEST_VERSION = 4
SPLITS = ("train", "val")
SHARD_FILES = ("codes", "captions", "text", "text_len", "images", "index")  # codes_00000.npy, captions_00000.jsonl
STAMPS = ".verified.json"  # files hashed again on a reopen because their mtime moved (a copy): their new stamp
VERIFY = ("size", "changed", "full")  # what reopening hashes: nothing, files whose stamp moved, everything
NPY_HEADER = 128  # bytes: the fixed .npy header `_NpyStream` rewrites with the final shape


def _shard_name(kind: str, k: int) -> str:
    return f"{kind}_{k:05d}." + ("jsonl" if kind == "captions" else "npy")


def _file_record(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    stat = path.stat()
    return {"bytes": stat.st_size, "sha256": h.hexdigest(), "mtime_ns": stat.st_mtime_ns}


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A version-1.0 .npy header of exactly NPY_HEADER bytes (64-byte aligned, as numpy writes them)."""
    meta = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(d) for d in shape)})
    body = NPY_HEADER - 10  # magic (6) + version (2) + header length (2)
    if len(meta) >= body:
        raise PartiError(f"array shape {shape} does not fit a {NPY_HEADER}-byte header")
    return b"\x93NUMPY\x01\x00" + body.to_bytes(2, "little") + (meta.ljust(body - 1) + "\n").encode("latin1")


class _NpyStream:
    """A .npy file written a batch at a time: rows go to a hidden partial file (removed by the next encode if
    this one is killed) under a placeholder header; `finish` writes the real header, fsyncs and renames the
    file into place, as `atomic_write` does, and returns its manifest record."""

    def __init__(self, path: Path, dtype: Any, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), tuple(row_shape), 0
        self.partial = path.with_name(f".{path.name}.partial.tmp")
        self.file = self._io(lambda: open(self.partial, "wb"))
        self._io(lambda: self.file.write(bytes(NPY_HEADER)))

    def _io(self, fn):
        try:
            return fn()
        except OSError as e:
            raise PartiError(f"could not write {self.path}: {e.strerror or e}; free disk space or choose another "
                             f"--out") from e

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, not {self.row_shape}")
        self._io(lambda: self.file.write(rows.reshape(-1).view(np.uint8).data))
        self.rows += len(rows)

    def finish(self) -> dict[str, Any]:
        def close() -> None:
            self.file.seek(0)
            self.file.write(_npy_header((self.rows, *self.row_shape), self.dtype))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.partial, self.path)

        self._io(close)
        fsync_dir(self.path.parent)
        return _file_record(self.path)


def _save_text(path: Path, text: str) -> dict[str, Any]:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return _file_record(path)


def cache_inputs(*, data: str, image_column: str | None = None, caption_column: str | None = None,
                 synthetic_length: int | None = DEFAULT_LENGTH, seed: int = 0, holdout: bool = False,
                 max_items: int | None = None) -> dict[str, Any]:
    """Every setting that shapes a cache's items, as its manifest records them ("inputs") and a run compares
    them (`stale_inputs`). Settings that do not apply to the data are None: a table has no synthetic length."""
    synthetic = data == "synthetic"
    return {"data": data, "image_column": image_column, "caption_column": caption_column,
            "synthetic_length": synthetic_length if synthetic else None, "seed": seed if synthetic else None,
            "holdout": bool(holdout), "max_items": max_items, "caption_bytes": MAX_TEXT_BYTES}


def stale_inputs(manifest: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
    """'name: made -> wanted' for each of `inputs` the cache was made with another value of."""
    made = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
    return [f"{k}: {made.get(k)!r} -> {v!r}" for k, v in inputs.items() if made.get(k) != v]


def check_cache_out(out: str | Path, *, reads: tuple[str | Path | None, ...] = ()) -> Path:
    """`out` may take a code cache (the output guard, `parti.runs.check_output`, before any work): a new or
    empty folder, or a cache (re-encoded), outside the folders read and outside any model or run folder but
    as its own cache/ (a generator run's)."""
    return check_output(out, folder=True, slots=(CACHE_DIR,), reads=reads, may_be="cache", replaces=_foreign)


def _foreign(out: Path) -> str | None:
    """None when folder `out` holds nothing but a cache (finished or killed), else what else it holds."""
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (MANIFEST, *SPLITS) and not p.name.startswith("."))
    return (f"holds files that are not a code cache ({foreign[:5]}); give an empty or new folder, or an existing "
            f"cache to re-encode") if foreign else None


def _prepare_out(out: Path) -> None:
    """`out` is ours to write: missing, empty, or a cache (finished or killed). The old manifest goes first,
    so a re-encode killed half-way leaves no manifest over a mix of old and new shards."""
    if out.exists() and not out.is_dir():
        raise PartiError(f"--out {out} is a file; give a folder for the code cache")
    if out.is_dir() and _foreign(out):
        raise PartiError(f"--out {out} {_foreign(out)}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        (out / STAMPS).unlink(missing_ok=True)
        fsync_dir(out)
        for split in SPLITS:
            for pattern in (*(f"{kind}_*.*" for kind in SHARD_FILES), ".*.tmp"):  # old shards, killed writes
                for stale in (out / split).glob(pattern):
                    stale.unlink()
    except OSError as e:
        raise PartiError(f"could not write {out}: {e.strerror or e}; choose another --out") from e


def _check_encode_args(*, batch_size: int, shard_size: int, max_items: int | None, num_workers: int,
                       splits: tuple[str, ...]) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                             ("num_workers", num_workers, 0), ("max_items", max_items if max_items is not None else 1, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PartiError(f"encode: {name} must be an integer >= {low}, got {value!r}")
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise PartiError(f"encode: splits must be among {list(SPLITS)}, got {list(splits)}")


@dataclass
class EncodeConfig:
    """`parti encode`: the arguments of `encode_dataset`, with the text encoder by name. Counts are bounded
    where `encode_dataset` checks them (`_check_encode_args`), so Python callers get the same messages."""

    data: str | None = setting(None, "synthetic, a folder, hf:NAME or a dataset path", required=True)
    tokenizer: str | None = setting(None, "tokenizer folder", required=True)
    out: str | None = setting(None, "cache folder to write", required=True)
    text_encoder: str = setting("trainable", "trainable (cache captions only) or a frozen T5: "
                                "t5-small|t5-base|t5-large|hub name|folder")
    batch_size: int = setting(64, "images per batch")
    device: str | None = setting(None, "cpu, cuda, ... (default: a GPU when there is one)")
    synthetic_length: int = setting(DEFAULT_LENGTH, "synthetic faces in the training split")
    holdout: bool = setting(False, "synthetic: leave out the held-out (hair, background) pairs, as "
                            "`parti train-generator --holdout`")
    num_workers: int | None = setting(None, "data loader processes that decode images (default: one per CPU core up "
                                      "to 4 with a GPU, none on the CPU)", minimum=0)
    image_column: str | None = setting(None, "table data: the image column")
    caption_column: str | None = setting(None, "table data: the caption column")
    max_items: int | None = setting(None, "encode at most this many items per split (default: all)")

    def __post_init__(self):
        check_settings(self)


def text_precision(device: torch.device) -> torch.dtype:
    """The frozen T5's compute dtype in an encode: bf16 where it is fast (CUDA from Ampere on, `fast_bf16`), fp32
    elsewhere (a T4, the CPU). Never fp16: T5's activations overflow it. The weights stay as loaded (autocast),
    so the encoder's identity, and the check that the generator's T5 is the cache's, do not change."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


def text_encoder_device(text_encoder, device: torch.device) -> torch.device:
    """Where a frozen text encoder runs: its own device (`FrozenT5.device`), else the tokenizer's."""
    return torch.device(getattr(text_encoder, "device", device))


def encode_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader processes that decode images during an encode. None: one per CPU core up to 4 when the
    networks run on a GPU (decoding a PNG costs more than tokenizing it there), none on the CPU, where the
    networks need the cores."""
    if num_workers is not None:
        return num_workers
    return min(4, os.cpu_count() or 1) if device.type != "cpu" else 0


@torch.no_grad()
def encode_dataset(*, data: str, tokenizer: str | Path, out: str | Path, text_encoder=None,
                   tokenizer_model: VQTokenizer | None = None, require_captions: bool = False,
                   splits: tuple[str, ...] = ("train", "val"), batch_size: int = 64, shard_size: int = 10000,
                   device: str | torch.device | None = None, synthetic_length: int = DEFAULT_LENGTH, seed: int = 0,
                   holdout: bool = False, image_column: str | None = None, caption_column: str | None = None,
                   max_items: int | None = None, num_workers: int | None = None, progress: bool = True) -> Path:
    """Encode `data` with the tokenizer folder `tokenizer` (and a frozen `text_encoder`) into `out`.

    tokenizer_model: the tokenizer of folder `tokenizer`, already loaded (stage 2 passes its own: loaded once).
    require_captions: refuse caption-less data before anything is written (stage 2 learns from captions).
    holdout: synthetic faces without the held-out (hair, background) pairs (recorded in the manifest).
    num_workers: DataLoader processes that decode/render images while the tokenizer runs (`encode_workers`).
    The val split also keeps its images (uint8) and captions, for evaluation without the dataset.
    Shards are written first and the manifest, which lists every shard file with its size and sha256,
    last: a cache without a manifest is incomplete, and `CodeCache` refuses any file that differs.
    """
    _check_encode_args(batch_size=batch_size, shard_size=shard_size, max_items=max_items,
                       num_workers=num_workers if num_workers is not None else 0, splits=tuple(splits))
    check_cache_out(out, reads=(tokenizer,))  # before the tokenizer loads or a source opens
    device = default_device(device)
    tok = tokenizer_model.to(device) if tokenizer_model is not None else load_tokenizer(tokenizer, device=device)
    if tok.config.codebook_size > 65536:
        raise PartiError("codebooks above 65536 codes do not fit the uint16 cache")
    if text_encoder is not None and getattr(text_encoder, "trainable", False):
        text_encoder = None  # a trainable encoder runs inside training; only captions are cached
    sources = {split: data_mod.open_source(data, split=split, image_size=tok.config.image_size,
                                           image_column=image_column, caption_column=caption_column, seed=seed,
                                           holdout=holdout,
                                           synthetic_length=synthetic_length if split == "train" else None)
               for split in splits}
    if require_captions and not sources.get("train", next(iter(sources.values()))).has_captions:
        raise PartiError(f"{data} has no captions, and the generator learns from them; give captioned data "
                         f"(or --caption-column COLUMN for a table)")
    out = Path(out)
    _prepare_out(out)
    manifest = _manifest_head(data=data, tokenizer=tokenizer, tok=tok, text_encoder=text_encoder, holdout=holdout,
                              device=device,
                              inputs=cache_inputs(data=data, image_column=image_column, caption_column=caption_column,
                                                  synthetic_length=synthetic_length, seed=seed, holdout=holdout,
                                                  max_items=max_items))
    workers = encode_workers(num_workers, device)
    for split, source in sources.items():
        n_items = len(source) if max_items is None else min(len(source), max_items)
        loader = DataLoader(torch.utils.data.Subset(source, list(range(n_items))), batch_size=batch_size,
                            collate_fn=data_mod.collate, num_workers=workers, pin_memory=device.type == "cuda",
                            worker_init_fn=data_mod.ignore_stop_signals)
        writer = _ShardWriter(out / split, shard_size=shard_size, tokens=tok.config.grid_size ** 2,
                              text_dim=manifest["text_dim"],
                              image_size=tok.config.image_size if split == "val" else None)  # held-out images
        _encode_split(loader, tok, text_encoder, writer, device=device, progress=progress, desc=f"encode {split}")
        count = sum(s["n"] for s in writer.shards)
        if count == 0:
            raise PartiError(f"no readable images in the {split} split of {data}")
        # skipped: unreadable items, counted here because DataLoader workers count their own
        manifest["splits"][split] = {"count": count, "shards": writer.shards, "skipped": n_items - count,
                                     "attempted": n_items, "source_items": len(source), "images": split == "val"}
        log.info("encoded %d %s images into %s", count, split, out / split)
    write_json(out / MANIFEST, manifest)  # last: a cache without a manifest is incomplete
    return out


def _manifest_head(*, data: str, tokenizer: str | Path, tok: VQTokenizer, text_encoder, holdout: bool,
                   inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The manifest before its splits: what made the cache (`device`: the tokenizer's)."""
    precision = text_precision(text_encoder_device(text_encoder, device)) if text_encoder is not None else None
    return {"kind": "code_cache", "version": MANIFEST_VERSION, "data": data, "tokenizer": str(tokenizer),
            "tokenizer_fingerprint": tok.fingerprint(), "image_size": tok.config.image_size,
            "grid_size": tok.config.grid_size, "num_codes": tok.config.codebook_size,
            "text_encoder": text_encoder.identity() if text_encoder is not None else None,
            "text_dim": getattr(text_encoder, "dim", None), "text_precision": str(precision).removeprefix("torch."),
            "holdout": holdout, "splits": {}, "inputs": inputs}


class _ShardWriter:
    """One split written shard by shard as batches arrive. Memory holds one batch and the shard's captions:
    codes, text states, images and indices stream to disk (`_NpyStream`)."""

    def __init__(self, folder: Path, *, shard_size: int, tokens: int, text_dim: int | None, image_size: int | None):
        self.folder, self.shard_size, self.shards = folder, shard_size, []
        self.rows: dict[str, tuple[Any, tuple[int, ...]]] = {"codes": (np.uint16, (tokens,))}
        if text_dim is not None:
            self.rows.update(text=(np.float16, (text_dim,)), text_len=(np.int32, ()))
        if image_size is not None:
            self.rows.update(images=(np.uint8, (image_size, image_size, 3)), index=(np.int64, ()))
        self.streams: dict[str, _NpyStream] = {}
        self.captions: list[str] = []

    def add(self, **arrays: np.ndarray | list[str]) -> None:
        """One batch: codes (B, T), captions [B], text (tokens, D) + text_len (B,), images (B, S, S, 3) + index
        (B,); a shard is finished once it holds shard_size rows or more."""
        if not self.streams:
            self.folder.mkdir(parents=True, exist_ok=True)
            k = len(self.shards)
            self.streams = {kind: _NpyStream(self.folder / _shard_name(kind, k), *shape)
                            for kind, shape in self.rows.items()}
        self.captions.extend(arrays["captions"])
        for kind, stream in self.streams.items():
            stream.append(arrays[kind])
        if self.streams["codes"].rows >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.streams:
            return
        k = len(self.shards)
        files = {_shard_name(kind, k): stream.finish() for kind, stream in self.streams.items()}
        files[_shard_name("captions", k)] = _save_text(self.folder / _shard_name("captions", k),
                                                       "".join(json.dumps(c) + "\n" for c in self.captions))
        self.shards.append({"index": k, "n": self.streams["codes"].rows, "files": files})
        self.streams, self.captions = {}, []

    def close(self) -> None:
        """Stop after an error or a signal: the partial files stay, as a kill leaves them (the next encode of
        this folder removes them, `_prepare_out`), and no shard of them is listed."""
        for stream in self.streams.values():
            stream.file.close()


def _encode_split(loader, tok: VQTokenizer, text_encoder, writer: _ShardWriter, *, device: torch.device,
                  progress: bool, desc: str) -> None:
    """Encode one split into `writer`, a batch at a time."""
    text_device = text_encoder_device(text_encoder, device)
    dtype = text_precision(text_device)
    if text_encoder is not None:
        log.info("frozen text encoder runs in %s on %s", str(dtype).removeprefix("torch."), text_device)
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress):
            if batch is not None:  # None: every item of the batch was unreadable
                writer.add(**_encode_batch(batch, tok, text_encoder, device=device, text_device=text_device,
                                           dtype=dtype, images="images" in writer.rows))
        writer.flush()
    except BaseException:
        writer.close()
        raise


def _encode_batch(batch: dict[str, Any], tok: VQTokenizer, text_encoder, *, device: torch.device,
                  text_device: torch.device, dtype: torch.dtype, images: bool) -> dict[str, Any]:
    """One collated batch -> the arrays `_ShardWriter.add` takes. T5 states keep only their real tokens."""
    codes = tok.encode(batch["image"].to(device, non_blocking=True)).flatten(1)  # (B, T)
    arrays: dict[str, Any] = {"codes": codes.cpu().numpy(),
                              "captions": [clip_text(c) if c is not None else "" for c in batch["caption"]]}
    if text_encoder is not None:
        with torch.autocast(text_device.type, dtype=dtype, enabled=dtype != torch.float32):
            states, mask = text_encoder.encode(arrays["captions"])  # (B, L, D), (B, L)
        mask = mask.bool()
        arrays["text"] = states[mask].to(torch.float16).cpu().numpy()  # (sum of lengths, D), row after row
        arrays["text_len"] = mask.sum(1).cpu().numpy()
    if images:  # [-1, 1] floats back to the 8-bit pixels they were made from (exactly)
        pixels = ((batch["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        arrays["images"] = pixels.permute(0, 2, 3, 1).numpy()  # (B, S, S, 3)
        arrays["index"] = batch["index"].numpy()
    return arrays


def is_cache(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class CodeCache(Dataset):
    """One split of a cache: items {"codes": (T,) long, "caption": str[, "text": (L, D) fp16]}.

    Opening checks everything against the manifest before training can start: each shard file's size, and
    its sha256 as `verify` says (`VERIFY`): "changed" (the default) hashes only files whose mtime differs from
    the one recorded when they were written or last hashed (a copied cache is hashed once, then its new stamps
    are kept in .verified.json), "full" hashes every file, "size" none. Then codes (n, grid_size**2) uint16 below
    num_codes, one caption per code row (JSON strings), text states (tokens, text_dim) with row lengths >= 1
    adding up to tokens. Any mismatch is a one-line PartiError that says to re-run `parti encode`.
    """

    def __init__(self, folder: str | Path, split: str = "train", *, verify: str = "changed"):
        self.root = Path(folder)
        if not is_cache(self.root):
            raise PartiError(f"{self.root} is not a code cache (no {MANIFEST}: missing, or an encode that was "
                             f"stopped); create one with `parti encode`")
        self.manifest = read_manifest(self.root)
        splits = self.manifest["splits"]
        if split not in splits:
            raise PartiError(f"cache {self.root} has no {split!r} split; it has {sorted(splits)}")
        checker = _FileChecker(self.root, verify)
        self.codes, self.captions, self.text, self.text_starts = [], [], [], []
        for shard in splits[split]["shards"]:
            codes, captions, text, starts = _load_shard(self.root, split, shard, self.manifest, checker=checker)
            self.codes.append(codes)
            self.captions.extend(captions)
            if self.has_text:
                self.text.append(text)
                self.text_starts.append(starts)
        checker.save()
        self.offsets = np.cumsum([0] + [len(c) for c in self.codes])
        if int(self.offsets[-1]) != splits[split]["count"]:
            raise _corrupt(self.root, f"the {split} split has {int(self.offsets[-1])} items, the manifest says "
                                      f"{splits[split]['count']}")

    @property
    def has_text(self) -> bool:
        return self.manifest.get("text_encoder") is not None

    def check(self, *, tokenizer_fingerprint: str, text_identity: dict | None, holdout: bool | None = None,
              grid_size: int | None = None, num_codes: int | None = None,
              inputs: dict[str, Any] | None = None) -> None:
        """Refuse the cache if it was made by another tokenizer or T5 than the ones given, or (holdout not
        None) with the held-out synthetic pairs left in when they should be out, or the other way round,
        or (grid_size / num_codes given: the tokenizer's) with codes of another grid or codebook, or (inputs
        given: some of `cache_inputs`) from other data settings."""
        stale = stale_inputs(self.manifest, inputs or {})
        if stale:
            raise PartiError(f"cache {self.root} was encoded from other inputs ({'; '.join(stale[:4])}); re-run "
                             f"`parti encode` with these settings")
        made_holdout = bool(self.manifest.get("holdout", False))
        if holdout is not None and made_holdout != holdout:
            raise PartiError(f"cache {self.root} was encoded {'with' if made_holdout else 'without'} --holdout, but "
                             f"this run asks {'for' if holdout else 'not for'} it; re-run `parti encode` "
                             f"{'with' if holdout else 'without'} --holdout or drop the flag here")
        made = self.manifest["tokenizer_fingerprint"]
        if made != tokenizer_fingerprint:
            raise PartiError(f"cache {self.root} was made with tokenizer {made}, not {tokenizer_fingerprint}; "
                             f"re-run `parti encode` with this tokenizer")
        for key, want in (("grid_size", grid_size), ("num_codes", num_codes)):
            if want is not None and self.manifest[key] != want:
                raise PartiError(f"cache {self.root} holds codes with {key} {self.manifest[key]}, the tokenizer has "
                                 f"{want}; re-run `parti encode` with this tokenizer")
        if text_identity is not None and self.manifest.get("text_encoder") != text_identity:
            raise PartiError(f"cache {self.root} holds text states of {self.manifest.get('text_encoder')}, "
                             f"not {text_identity}; re-run `parti encode --text-encoder ...`")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[s])
        item = {"codes": torch.from_numpy(self.codes[s][j].astype(np.int64)), "caption": self.captions[i]}
        if self.has_text:
            start, end = int(self.text_starts[s][j]), int(self.text_starts[s][j + 1])
            item["text"] = torch.from_numpy(np.array(self.text[s][start:end]))  # (L, D): this row's real tokens
        return item


class HeldOutImages(Dataset):
    """The val split's images and captions as an encode kept them, read like `open_source`'s val split: items
    {"image": (3, S, S) float in [-1, 1], bit for bit what the source gave, "caption": str, "index": int}.
    `limit`: only rows that came from the first `limit` items of the split. Files are checked as `CodeCache`
    checks them (`verify`)."""

    def __init__(self, folder: str | Path, *, limit: int | None = None, verify: str = "changed"):
        self.root = Path(folder)
        m = read_manifest(self.root)
        split = m["splits"].get("val")
        if not (isinstance(split, dict) and split.get("images") is True):
            raise PartiError(f"cache {self.root} keeps no held-out images; re-run `parti encode` to keep them")
        self.name, self.split, self.image_size, self.has_captions = str(self.root), "val", m["image_size"], True
        checker, size = _FileChecker(self.root, verify), m["image_size"]
        self.rows: list[tuple[np.ndarray, int, str, int]] = []  # (shard images, row, caption, source index)
        for shard in split["shards"]:
            k, n = shard["index"], shard["n"]
            for kind in ("images", "index", "captions"):
                checker.check(self.root / "val" / _shard_name(kind, k), shard["files"].get(_shard_name(kind, k)))
            images = _open_npy(self.root, self.root / "val" / _shard_name("images", k))
            index = np.array(_open_npy(self.root, self.root / "val" / _shard_name("index", k)))
            if images.shape != (n, size, size, 3) or images.dtype != np.uint8 or index.shape != (n,) \
                    or index.dtype != np.int64:
                raise _corrupt(self.root, f"val/{_shard_name('images', k)} or {_shard_name('index', k)} has shape "
                                          f"{images.shape} / {index.shape}, not ({n}, {size}, {size}, 3) / ({n},)")
            captions = _read_captions(self.root, self.root / "val" / _shard_name("captions", k), n)
            self.rows += [(images, j, captions[j], int(index[j])) for j in range(n)
                          if limit is None or index[j] < limit]
        checker.save()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        images, j, caption, index = self.rows[i]
        # the arithmetic of `parti.data.to_tensor`, so the floats equal the source's
        x = (np.asarray(images[j], dtype=np.float32) / np.float32(127.5) - np.float32(1.0)).transpose(2, 0, 1)
        return {"image": torch.from_numpy(np.ascontiguousarray(x)), "caption": caption, "index": index}


HELD_OUT_INPUTS = ("data", "image_column", "caption_column", "seed", "holdout", "caption_bytes")  # what the val
# split's items depend on (`cache_inputs`); the synthetic length and max_items shape the train split or the count


def held_out_source(caches: tuple[str | Path, ...], *, data: str, inputs: dict[str, Any], image_size: int,
                    num_images: int) -> HeldOutImages | None:
    """The first `num_images` items of `data`'s val split, read from the first of `caches` that keeps them: a
    cache given as the data itself, or one encoded from the same `inputs` (`cache_inputs`) at `image_size`
    from at least that many items. None when no cache does (the caller opens the data); says which in a log."""
    for root in (Path(c) for c in caches):
        if not is_cache(root):
            continue
        try:
            m = read_manifest(root)
        except PartiError as e:
            log.warning("held-out images: not from %s (%s)", root, e)
            continue
        split = m["splits"].get("val") if isinstance(m["splits"].get("val"), dict) else {}
        count = split.get("source_items")
        wanted = min(num_images, count) if _is_int(count, 0, 2**40) else num_images
        why = _held_out_mismatch(root, m, split, data=data, inputs=inputs, image_size=image_size, wanted=wanted)
        if why:
            log.info("held-out images: not from the code cache %s: %s", root, why)
            continue
        source = HeldOutImages(root, limit=wanted)
        log.info("held-out images and captions: %d from the code cache %s; %s is not opened", len(source), root, data)
        return source
    return None


def _held_out_mismatch(root: Path, m: dict[str, Any], split: dict[str, Any], *, data: str,
                       inputs: dict[str, Any], image_size: int, wanted: int) -> str | None:
    """Why cache `root` (manifest `m`, val split record `split`) cannot stand in for `data`'s val split, or None."""
    if split.get("images") is not True:
        return "it keeps no held-out images"
    if m["image_size"] != image_size:
        return f"its images are {m['image_size']} px, not {image_size}"
    if Path(data).expanduser() == root:  # the data asked for is this cache
        return None
    stale = stale_inputs(m, {k: inputs.get(k) for k in HELD_OUT_INPUTS})
    if stale:
        return f"it was made from other data ({'; '.join(stale)})"
    if not _is_int(split.get("attempted"), wanted, 2**40):
        return f"it keeps the first {split.get('attempted')} items of the split, not the {wanted} asked for"
    return None


def _corrupt(root: Path, detail: str) -> PartiError:
    return PartiError(f"cache {root} is damaged or was edited: {detail}; re-run `parti encode` to rebuild it")


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json with every field the loader relies on checked for type and range."""
    m = read_json(root / MANIFEST)
    if m.get("kind") != "code_cache":
        raise _corrupt(root, f"{MANIFEST} is not a code cache manifest (kind {m.get('kind')!r})")
    if m.get("version") != MANIFEST_VERSION:
        raise PartiError(f"cache {root} was written by an older parti (manifest version {m.get('version')}, this "
                         f"one reads {MANIFEST_VERSION}); re-run `parti encode` to rebuild it")
    if not isinstance(m.get("tokenizer_fingerprint"), str):
        raise _corrupt(root, "the manifest names no tokenizer fingerprint")
    if not (_is_int(m.get("grid_size"), 1, 256) and _is_int(m.get("num_codes"), 2, 65536)):
        raise _corrupt(root, f"grid_size {m.get('grid_size')!r} / num_codes {m.get('num_codes')!r} are out of range")
    if not isinstance(m.get("inputs"), dict) or not isinstance(m["inputs"].get("data"), str):
        raise _corrupt(root, "the manifest does not record the inputs it was made from")
    if m.get("text_encoder") is not None and not _is_int(m.get("text_dim"), 1, 16384):
        raise _corrupt(root, f"text_dim {m.get('text_dim')!r} is not a width")
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise _corrupt(root, f"{MANIFEST} has no 'splits'")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if name not in SPLITS or not isinstance(shards, list) or not _is_int(split.get("count"), 0, 2**40):
            raise _corrupt(root, f"split {name!r} of the manifest is malformed")
        for k, shard in enumerate(shards):
            if not (isinstance(shard, dict) and shard.get("index") == k and _is_int(shard.get("n"), 1, 2**40)
                    and isinstance(shard.get("files"), dict)):
                raise _corrupt(root, f"shard {k} of split {name!r} is malformed in the manifest")
    return m


def _load_shard(root: Path, split: str, shard: dict[str, Any], m: dict[str, Any], *,
                checker: _FileChecker) -> tuple[np.ndarray, list[str], np.ndarray | None, np.ndarray | None]:
    """(codes (n, T) uint16 memmap, n captions, text (tokens, D) memmap | None, row starts (n + 1,) | None)."""
    k, n = shard["index"], shard["n"]
    folder = root / split
    kinds = ("codes", "captions", "text", "text_len") if m.get("text_encoder") is not None else ("codes", "captions")
    for kind in kinds:
        checker.check(folder / _shard_name(kind, k), shard["files"].get(_shard_name(kind, k)))
    tokens = m["grid_size"] ** 2
    codes = _open_npy(root, folder / _shard_name("codes", k))
    if codes.dtype != np.uint16 or codes.shape != (n, tokens):
        raise _corrupt(root, f"{split}/{_shard_name('codes', k)} holds {codes.dtype} codes of shape {codes.shape}, "
                             f"not ({n}, {tokens}) uint16 ({m['grid_size']}x{m['grid_size']} codes per image)")
    if n and int(codes.max()) >= m["num_codes"]:
        raise _corrupt(root, f"{split}/{_shard_name('codes', k)} holds code {int(codes.max())}, outside the "
                             f"tokenizer's {m['num_codes']} codes")
    captions = _read_captions(root, folder / _shard_name("captions", k), n)
    if m.get("text_encoder") is None:
        return codes, captions, None, None
    text = _open_npy(root, folder / _shard_name("text", k))
    lengths = _open_npy(root, folder / _shard_name("text_len", k))
    if text.ndim != 2 or text.shape[1] != m["text_dim"] or text.dtype != np.float16:
        raise _corrupt(root, f"{split}/{_shard_name('text', k)} has shape {text.shape} {text.dtype}, not "
                             f"(tokens, {m['text_dim']}) float16")
    if lengths.shape != (n,) or lengths.dtype != np.int32:
        raise _corrupt(root, f"{split}/{_shard_name('text_len', k)} has shape {lengths.shape}, not ({n},) int32")
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # row j: text[starts[j]:starts[j + 1]]
    if n and (lengths.min() < 1 or starts[-1] != text.shape[0]):
        raise _corrupt(root, f"{split}/{_shard_name('text_len', k)} holds lengths below 1 or not adding up to the "
                             f"{text.shape[0]} rows of {_shard_name('text', k)}")
    return codes, captions, text, starts


class _FileChecker:
    """Checks shard files against their manifest records as `verify` (one of VERIFY) says, keeping the stamps
    (size, mtime, sha256) of files it hashed and found whole in STAMPS, so the next reopen need not hash them."""

    def __init__(self, root: Path, verify: str):
        if verify not in VERIFY:
            raise PartiError(f"verify must be one of {', '.join(VERIFY)}; got {verify!r}")
        self.root, self.verify, self.changed = root, verify, False
        self.stamps = self._read_stamps() if verify == "changed" else {}

    def _read_stamps(self) -> dict[str, list]:
        try:
            stamps = read_json(self.root / STAMPS) if (self.root / STAMPS).is_file() else {}
        except PartiError:  # a damaged stamp file only costs hashing again
            return {}
        return {k: v for k, v in stamps.items() if isinstance(v, list) and len(v) == 3}

    def check(self, path: Path, record: Any) -> None:
        root, name = self.root, f"{path.parent.name}/{path.name}"
        if not (isinstance(record, dict) and _is_int(record.get("bytes"), 0, 2**50)
                and isinstance(record.get("sha256"), str)):
            raise _corrupt(root, f"the manifest does not list {name} with its size and checksum")
        if not path.is_file():
            raise _corrupt(root, f"{name} is missing")
        stat = path.stat()
        if stat.st_size != record["bytes"]:
            raise _corrupt(root, f"{name} has {stat.st_size} bytes, the manifest says {record['bytes']} (truncated "
                                 f"or replaced)")
        stamp = [stat.st_size, stat.st_mtime_ns, record["sha256"]]
        if self.verify == "size" or self.verify == "changed" and (
                record.get("mtime_ns") == stat.st_mtime_ns or self.stamps.get(name) == stamp):
            return
        if _file_record(path)["sha256"] != record["sha256"]:
            raise _corrupt(root, f"{name} does not match its checksum in the manifest (changed after encoding)")
        if self.verify == "changed":
            self.stamps[name], self.changed = stamp, True

    def save(self) -> None:
        """Keep the stamps of the files hashed now; a read-only cache is simply hashed again next time."""
        if self.changed:
            try:
                write_json(self.root / STAMPS, self.stamps)
            except PartiError:
                pass


def _open_npy(root: Path, path: Path) -> np.ndarray:
    """Memory-map a .npy; pickled object arrays, truncated files and impossible headers are refused."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _corrupt(root, f"{path.parent.name}/{path.name} is not a readable array file ({e})") from None


def _read_captions(root: Path, path: Path, n: int) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _corrupt(root, f"{path.parent.name}/{path.name} is unreadable ({e})") from None
    if len(lines) != n:
        raise _corrupt(root, f"{path.parent.name}/{path.name} has {len(lines)} captions for {n} images; every "
                             f"caption after a missing line would belong to the wrong image")
    captions = []
    for number, line in enumerate(lines, 1):
        try:
            caption = json.loads(line)
        except ValueError:
            caption = None
        if not isinstance(caption, str):
            raise _corrupt(root, f"line {number} of {path.parent.name}/{path.name} is not a JSON string")
        captions.append(caption)
    return captions


def collate_codes(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"codes": torch.stack([it["codes"] for it in items]), "caption": [it["caption"] for it in items]}
    if "text" in items[0]:
        width = max(it["text"].shape[0] for it in items)
        text = torch.zeros(len(items), width, items[0]["text"].shape[1], dtype=torch.float16)
        mask = torch.zeros(len(items), width, dtype=torch.bool)
        for b, it in enumerate(items):
            text[b, :it["text"].shape[0]] = it["text"]
            mask[b, :it["text"].shape[0]] = True
        batch["text"], batch["text_mask"] = text, mask
    return batch

