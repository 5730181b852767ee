"""The code cache: a frozen tokenizer (and frozen T5) run once over a dataset, stored on disk.

Stage 2 trains from here and never runs a frozen network per step (LlamaGen `extract_codes`).
Layout of a cache folder, one subfolder per split:

  manifest.json                      what made it: every input that shapes it (data, columns, synthetic length
                                     and seed, holdout, caption byte bound), tokenizer fingerprint, text
                                     encoder identity, image size, sizes
  train/codes_00000.npy              (n, T) uint16 image codes, memory-mappable
  train/captions_00000.jsonl         one caption per line (JSON strings)
  train/text_00000.npy               (n, L_shard, D) float16 T5 states   [only with a frozen T5]
  train/text_len_00000.npy           (n,) int32 number of real tokens      [only with a frozen T5]

manifest.json is written last (the old one is removed first) and lists every shard file with its size
and sha256; `.npy` files are read with allow_pickle=False; a cache whose files, counts or shapes differ
from its manifest, or whose tokenizer or T5 differs from the run's, is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from parti import data as data_mod
from parti.checkpoint import CACHE_DIR
from parti.device import default_device
from parti.errors import PartiError
from parti.files import atomic_write, fsync_dir, read_json, write_json
from parti.runs import check_output
from parti.settings import check_settings, setting
from parti.synthetic import DEFAULT_LENGTH
from parti.text import MAX_TEXT_BYTES, clip_text
from parti.tokenizer import VQTokenizer, load_tokenizer

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MANIFEST_VERSION = 3  # 2: shards list their files with sizes and sha256; 3: "inputs", every setting that shaped it
SPLITS = ("train", "val")
SHARD_FILES = ("codes", "captions", "text", "text_len")  # codes_00000.npy, captions_00000.jsonl, ...


def _shard_name(kind: str, k: int) -> str:
    return f"{kind}_{k:05d}." + ("jsonl" if kind == "captions" else "npy")


def _file_record(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)
    return _file_record(path)


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
    num_workers: int = setting(0, "data loader processes")
    image_column: str | None = setting(None, "table data: the image column")
    caption_column: str | None = setting(None, "table data: the caption column")
    max_items: int | None = setting(None, "encode at most this many items per split (default: all)")

    def __post_init__(self):
        check_settings(self)


@torch.no_grad()
def encode_dataset(*, data: str, tokenizer: str | Path, out: str | Path, text_encoder=None,
                   tokenizer_model: VQTokenizer | None = None, require_captions: bool = False,
                   splits: tuple[str, ...] = ("train", "val"), batch_size: int = 64, shard_size: int = 10000,
                   device: str | torch.device | None = None, synthetic_length: int = DEFAULT_LENGTH, seed: int = 0,
                   holdout: bool = False, image_column: str | None = None, caption_column: str | None = None,
                   max_items: int | None = None, num_workers: int = 0, progress: bool = True) -> Path:
    """Encode `data` with the tokenizer folder `tokenizer` (and a frozen `text_encoder`) into `out`.

    tokenizer_model: the tokenizer of folder `tokenizer`, already loaded (stage 2 passes its own: loaded once).
    require_captions: refuse caption-less data before anything is written (stage 2 learns from captions).
    holdout: synthetic faces without the held-out (hair, background) pairs (recorded in the manifest).
    num_workers: DataLoader processes that decode/render images while the tokenizer runs.
    Shards are written first and the manifest, which lists every shard file with its size and sha256,
    last: a cache without a manifest is incomplete, and `CodeCache` refuses any file that differs.
    """
    _check_encode_args(batch_size=batch_size, shard_size=shard_size, max_items=max_items, num_workers=num_workers,
                       splits=tuple(splits))
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
    manifest: dict[str, Any] = {
        "kind": "code_cache", "version": MANIFEST_VERSION, "data": data, "tokenizer": str(tokenizer),
        "tokenizer_fingerprint": tok.fingerprint(), "image_size": tok.config.image_size,
        "grid_size": tok.config.grid_size, "num_codes": tok.config.codebook_size,
        "text_encoder": text_encoder.identity() if text_encoder is not None else None,
        "text_dim": getattr(text_encoder, "dim", None), "holdout": holdout, "splits": {},
        "inputs": cache_inputs(data=data, image_column=image_column, caption_column=caption_column,
                               synthetic_length=synthetic_length, seed=seed, holdout=holdout, max_items=max_items),
    }
    for split, source in sources.items():
        n_items = len(source) if max_items is None else min(len(source), max_items)
        loader = DataLoader(torch.utils.data.Subset(source, list(range(n_items))), batch_size=batch_size,
                            collate_fn=data_mod.collate, num_workers=num_workers,
                            worker_init_fn=data_mod.ignore_stop_signals)
        shards = _encode_split(loader, tok, text_encoder, out / split, shard_size=shard_size, device=device,
                               progress=progress, desc=f"encode {split}")
        count = sum(s["n"] for s in shards)
        if count == 0:
            raise PartiError(f"no readable images in the {split} split of {data}")
        manifest["splits"][split] = {"count": count, "shards": shards, "skipped": getattr(source, "skipped", 0)}
        log.info("encoded %d %s images into %s", count, split, out / split)
    write_json(out / MANIFEST, manifest)  # last: a cache without a manifest is incomplete
    return out


def _encode_split(loader, tok: VQTokenizer, text_encoder, folder: Path, *, shard_size: int, device: torch.device,
                  progress: bool, desc: str) -> list[dict[str, Any]]:
    """Encode one split into `folder` shard by shard; returns the shard records for the manifest."""
    shards: list[dict[str, Any]] = []
    codes_buf, caps_buf, text_buf, len_buf = [], [], [], []

    def flush() -> None:
        if not codes_buf:
            return
        k = len(shards)
        files = {_shard_name("codes", k): _save_npy(folder / _shard_name("codes", k),
                                                    np.concatenate(codes_buf).astype(np.uint16)),
                 _shard_name("captions", k): _save_text(folder / _shard_name("captions", k),
                                                        "".join(json.dumps(c) + "\n" for c in caps_buf))}
        if text_buf:
            width = max(t.shape[1] for t in text_buf)
            padded = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in text_buf]
            files[_shard_name("text", k)] = _save_npy(folder / _shard_name("text", k),
                                                      np.concatenate(padded).astype(np.float16))
            files[_shard_name("text_len", k)] = _save_npy(folder / _shard_name("text_len", k),
                                                          np.concatenate(len_buf).astype(np.int32))
        shards.append({"index": k, "n": sum(len(c) for c in codes_buf), "files": files})
        codes_buf.clear(), caps_buf.clear(), text_buf.clear(), len_buf.clear()

    for batch in tqdm(loader, desc=desc, disable=not progress):
        if batch is None:
            continue
        codes = tok.encode(batch["image"].to(device)).flatten(1).cpu().numpy()
        captions = [clip_text(c) if c is not None else "" for c in batch["caption"]]  # stored bounded
        codes_buf.append(codes)
        caps_buf.extend(captions)
        if text_encoder is not None:
            states, mask = text_encoder.encode(captions)
            lengths = mask.sum(1)
            text_buf.append(states[:, :int(lengths.max())].float().cpu().numpy())
            len_buf.append(lengths.cpu().numpy())
        if sum(len(c) for c in codes_buf) >= shard_size:
            flush()
    flush()
    return shards


def is_cache(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class CodeCache(Dataset):
    """One split of a cache: items {"codes": (T,) long, "caption": str[, "text": (L, D) fp16]}.

    Opening checks everything against the manifest before training can start: each shard file's size and
    sha256 (`verify=False` checks sizes only), codes (n, grid_size**2) uint16 below num_codes, one caption
    per code row (JSON strings), text states (n, L, text_dim) with lengths in [1, L]. Any mismatch is a
    one-line PartiError that says to re-run `parti encode`.
    """

    def __init__(self, folder: str | Path, split: str = "train", *, verify: bool = True):
        self.root = Path(folder)
        if not is_cache(self.root):
            raise PartiError(f"{self.root} is not a code cache (no {MANIFEST}: missing, or an encode that was "
                             f"stopped); create one with `parti encode`")
        self.manifest = read_manifest(self.root)
        splits = self.manifest["splits"]
        if split not in splits:
            raise PartiError(f"cache {self.root} has no {split!r} split; it has {sorted(splits)}")
        self.codes, self.captions, self.text, self.text_len = [], [], [], []
        for shard in splits[split]["shards"]:
            codes, captions, text, text_len = _load_shard(self.root, split, shard, self.manifest, verify=verify)
            self.codes.append(codes)
            self.captions.extend(captions)
            if self.has_text:
                self.text.append(text)
                self.text_len.append(text_len)
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
            n = int(self.text_len[s][j])
            item["text"] = torch.from_numpy(np.array(self.text[s][j, :n]))
        return item


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
                verify: bool) -> tuple[np.ndarray, list[str], np.ndarray | None, np.ndarray | None]:
    """(codes (n, T) uint16 memmap, n captions, text (n, L, D) memmap | None, text_len (n,) | None)."""
    k, n = shard["index"], shard["n"]
    folder = root / split
    kinds = ("codes", "captions", "text", "text_len") if m.get("text_encoder") is not None else ("codes", "captions")
    for kind in kinds:
        _check_file(root, folder / _shard_name(kind, k), shard["files"].get(_shard_name(kind, k)), verify=verify)
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
    if text.ndim != 3 or text.shape[0] != n or text.shape[2] != m["text_dim"] or text.dtype != np.float16:
        raise _corrupt(root, f"{split}/{_shard_name('text', k)} has shape {text.shape} {text.dtype}, not "
                             f"({n}, L, {m['text_dim']}) float16")
    if lengths.shape != (n,) or lengths.dtype != np.int32:
        raise _corrupt(root, f"{split}/{_shard_name('text_len', k)} has shape {lengths.shape}, not ({n},) int32")
    lengths = np.array(lengths)
    if n and (lengths.min() < 1 or lengths.max() > text.shape[1]):
        raise _corrupt(root, f"{split}/{_shard_name('text_len', k)} holds lengths outside [1, {text.shape[1]}]")
    return codes, captions, text, lengths


def _check_file(root: Path, path: Path, record: Any, *, verify: bool) -> None:
    name = f"{path.parent.name}/{path.name}"
    if not (isinstance(record, dict) and _is_int(record.get("bytes"), 0, 2**50) and isinstance(record.get("sha256"), str)):
        raise _corrupt(root, f"the manifest does not list {name} with its size and checksum")
    if not path.is_file():
        raise _corrupt(root, f"{name} is missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise _corrupt(root, f"{name} has {size} bytes, the manifest says {record['bytes']} (truncated or replaced)")
    if verify and _file_record(path)["sha256"] != record["sha256"]:
        raise _corrupt(root, f"{name} does not match its checksum in the manifest (changed after encoding)")


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

